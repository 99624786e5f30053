"""GEM-mini pretraining: stage 0 (the base VLM) and GEM's progressive stages 1-3, with the paper's ablations.

Run (the run directory --out gets run.json, log.jsonl and stage<k>/ checkpoints; eval.py vlm answers and draws):
    python train_pretrain.py --preset=tiny --recipe=base --data=data/gem-mini --out=runs/tiny/base
    python train_pretrain.py --preset=tiny --recipe=gem --init=runs/tiny/base --out=runs/tiny/gem
    torchrun --nproc_per_node=2 train_pretrain.py ...        # DDP (gloo on CPU, nccl on GPU)
    python train_pretrain.py ... --resume                      # continue --out exactly where it stopped
    python train_pretrain.py --help                            # every flag with its default
Load a result elsewhere: `gem, head, tok, tc = load_pretrained("runs/tiny/gem")` (run dir or stage dir).

Recipes (stage 3 has the same number of VLM updates and the same data order in every recipe):
    base     stage 0: ViT + merger + LLM from scratch on the caption family (--families0), text loss only
    sft      stage 3 only, text loss only (the no-depth baseline)
    gem      stages 1, 2, 3 with the depth flow-matching head
    rgb      stages 1, 2, 3 with the RGB-reconstruction target (paper's ablation)
    direct   stage 3 only, depth head untrained at the start (no progressive warm-up; paper's ablation)
    regress  stages 1, 2, 3 with the regression head (is "generative" what matters?)
  --blind=true (with sft): every image one grey image, the blind baseline; --scenes=lo:hi: a share of the
  train scenes (stage 0 and the recipes on disjoint scenes, the data-efficiency curve; data.select_scenes)

Making `tiny` learn (2-core CPU, ~2-4 min per recipe): the hard part is binding the question's words to
image regions. 8-px patches merged 2x2 give only 16 image tokens (cheap; each covers 16x16 px); learned
ViT positions + RoPE in the LLM; batches split by length (length_chunks) so the few long answers (object
lists, trajectories) do not pad every batch to 3x its mean length. The image comes first (the paper's and
Qwen-VL's order: the depth head's condition then does not depend on the question; --image_first=false is
the ablation, no better on val: 71.9 vs 73.3 reasoning). The text loss is a mean over SAMPLES
(--loss_norm=sample; the paper's code averages over tokens): with token averaging the one-token reasoning
answers get ~5% of the gradient and, after 150 steps, the model answers "B" to yes/no questions.
What this buys and what it does not: results/tiny/learning_curve.md, made by bench/tiny_learning_curve.py.

Paper -> code map (GEM's four ideas, each in one place)
    condition: last-layer hidden states at the image tokens    model.GEM.forward -> out["image_hidden"]
    connector + generative head + its flow loss                depth_head.GenerativeHead.loss
    progressive stages: what each trains, which loss          STAGES, trainable()
      (our head starts untrained unless --head_init, so stage 1 then trains connector + generator, logged)
    L = L_text + 0.1 * L_flow (stage 3)                        gem_loss (--lam)
    Released script: cosine lr, 3% warmup, weight decay 0, clip 1, bf16   common.lr_at, TrainConfig, autocast
Keeping a GPU fed (issue 13): samples decoded once (data.build_cache), batches collated in the loader's
worker processes (data.StepItems + host_chunks), images sent as uint8 (data.on_device), one read back per step
(train_step).
"""
from __future__ import annotations

import dataclasses
import functools
import gc
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import data as D
from common import (all_sum, config_from_dict, config_to_dict, die, git_commit, load_checkpoint, layer_flops,
                    lr_at, parse_config, peak_tflops, record_run, require, run_log, setup_dist, vlm_flops)
from depth_head import FLOW_CONVENTION, DepthHeadConfig, GenerativeHead, draw_noise
from hf import gem_from_hf
from model import GEM, MODEL_PRESETS, GEMConfig, load_tensors


@dataclasses.dataclass
class TrainConfig:
    preset: str = "tiny"
    recipe: str = "gem"              # base | sft | gem | rgb | direct | regress
    data: str = "data/gem-mini"      # a data directory (train/val.jsonl, images/, depth/, tokenizer.json) or one
                                     # released-layout JSONL (GEM-250K.jsonl: val = every 100th record)
    image_root: str = ""             # images are relative to this ("" = the JSONL's directory)
    depth_root: str = ""             # depth by basename: DIR/depth/<image basename>, or PREFIX=DIR,... per source
                                     # ("" = the JSONL's directory for a JSONL file; none for a data directory)
    out: str = "runs/tiny/gem"       # run directory
    init: Optional[str] = None       # stage-0 checkpoint (run dir or stage dir); required unless recipe=base
    head_init: Optional[str] = None  # checkpoint holding a trained head: stage 1 then trains the connector alone
    resume: bool = False
    seed: int = 0
    # model sizes (stage 0 only: later stages take every shape from --init): set as flags, --dim=256;
    # vocab_size and the special token ids always come from the tokenizer
    model: GEMConfig = dataclasses.field(default_factory=lambda: GEMConfig(**MODEL_PRESETS["tiny"]))
    image_first: bool = True         # the image before the question (paper, Qwen-VL); false = the ablation
    hf_vision: Optional[str] = None  # hf preset: local SiglipVisionModel dir (config.json + safetensors)
    hf_llm: Optional[str] = None     # hf preset: local Qwen3ForCausalLM dir (its tokenizer.json is used)
    # generative head (recipes with a head)
    head_width: int = 32             # conv channels of the head: 64 doubles a tiny GEM step on CPU
    cond_dim: int = 64
    head_size: int = 32              # target resolution of the generated depth
    lam: float = 0.1                 # L = L_text + lam * L_flow in stage 3
    loss_norm: str = "sample"        # text loss: mean over samples (sample) or over answer tokens (token, paper)
    # optimisation: per-stage steps and peak learning rates
    steps0: int = 150
    steps1: int = 40
    steps2: int = 100
    steps3: int = 300
    lr0: float = 2e-3
    lr1: float = 2e-3
    lr2: float = 2e-3
    lr3: float = 3e-3
    batch_size: int = 32             # per process and micro-step
    grad_accum: int = 1
    warmup: float = 0.05             # fraction of each stage's steps
    min_lr_frac: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    families: str = ""               # stage 1-3 families, comma separated ("" = every record of the split)
    families0: str = "caption"       # stage 0's families: the base VLM learns to see on these
    scenes: str = ""                 # "lo:hi": only these train scenes (data.select_scenes; "" = all)
    blind: bool = False              # every image one constant grey (the blind baseline; eval.py follows it)
    cache: bool = True               # decode the data once into <data>/cache (data.build_cache); false: PNGs every step
    cache_dir: str = ""              # where the cache goes when the data directory is read-only ("" = <data>/cache)
    max_len: int = 256               # tokens; a longer record is left out with a warning, never cut (its answer would
                                     # lose its end). tiny/micro data: <= ~190 (16 image tokens); small: 64 more
    # logging, evaluation, checkpoints
    log_every: int = 10
    eval_every: int = 100            # 0 = only at the end of each stage
    val_batches: int = 4             # validation losses on val_batches * batch_size records spread over the split
    ckpt_every: int = 100
    device: str = "auto"             # auto | cpu | cuda
    compile: bool = False
    peak_tflops: float = 0.0         # MFU denominator per GPU; 0 = from the GPU's name (PEAK_BF16_TFLOPS)
    threads: int = 0                 # torch CPU threads (0 = torch's default; 1 on a shared 2-core box)
    workers: int = 0                 # processes loading the next steps' samples (GPU: the data path is the bottleneck)
    stop_after: int = 0              # stop with a checkpoint after this many steps of this invocation (0 = never)


PRESETS = {  # model sizes from model.MODEL_PRESETS (flat keys: parse_config routes them to TrainConfig.model)
    # micro: seconds, for the tests
    "micro": dict(MODEL_PRESETS["micro"], image_size=64, head_width=16, cond_dim=16, head_size=16, steps0=4, steps1=2,
                  steps2=2, steps3=4, batch_size=4, log_every=1, eval_every=0, val_batches=1, ckpt_every=0),
    # tiny: 2-core CPU, a few minutes per recipe (see "Making tiny learn" above)
    "tiny": dict(MODEL_PRESETS["tiny"]),  # = the dataclass defaults
    # small: one GPU. A step costs ~46 GFLOP per sample (69 with the head; stages 1-2: 39), so the step counts
    # fit reproduce.py's 8 minutes: ~75 PFLOP for stage 0, six recipes and two VLAs, ~5 min at 250 TFLOP/s.
    # Epochs over sim_data.py's small split: stage 0 ~19 (3.3k captions), stage 3 ~3.4 (28k samples)
    "small": dict(MODEL_PRESETS["small"], head_width=128, cond_dim=256, head_size=64, steps0=1000, steps1=150, steps2=500,
                  steps3=1500, lr0=1e-3, lr3=3e-4, batch_size=64, workers=2, eval_every=500, ckpt_every=500, max_len=320),
    # hf: SigLIP + Qwen3 from local safetensors (--hf_vision, --hf_llm): every model size, the image size and
    # the pixel normalisation come from their configs (build_gem). head_size must be the token grid times a
    # power of two: 56 fits siglip-base-patch16-224 (grid 7) and siglip-so400m-patch14-384 (27 patches, grid 14)
    "hf": dict(head_width=128, cond_dim=512, head_size=56, steps0=2000, steps1=500, steps2=2000, steps3=6000, lr0=1e-4,
               lr1=1e-4, lr2=1e-4, lr3=1e-5, batch_size=16, grad_accum=4, workers=6, eval_every=1000, ckpt_every=500, max_len=512),
}
RECIPES = {"base": [0], "sft": [3], "gem": [1, 2, 3], "rgb": [1, 2, 3], "direct": [3], "regress": [1, 2, 3]}

# GEM's progressive training (PAPER.md "Training"): the parts each stage trains and the losses it uses.
# Everything not listed is frozen. Stage 0 is ours: the paper starts from a pretrained Qwen3-VL.
STAGES = {
    0: dict(trains=("vlm",), losses=("text",)),                              # the base VLM
    1: dict(trains=("connector",), losses=("flow",)),                        # connector initialisation (*)
    2: dict(trains=("connector", "generator"), losses=("flow",)),            # generator warm-up
    3: dict(trains=("vlm", "connector", "generator"), losses=("text", "flow")),  # joint: gem_loss
}
# (*) the paper's generator is pretrained; ours starts untrained unless --head_init gives one, and then
# stage 1 trains the generator too (trainable()): the VLM may only get depth gradients from a working head.


def gem_loss(stage: int, text, flow, lam: float):
    """The objective of a stage (STAGES[stage]["losses"]): text alone, flow alone, or GEM's joint loss."""
    losses = STAGES[stage]["losses"]
    if losses == ("text", "flow"):
        return text + lam * flow  # GEM, stage 3: L = L_text + lam * L_flow (paper: lam = 0.1)
    return text if losses == ("text",) else flow


# ----------------------------------------------------------------------------------------------------
# Models: build, freeze, save, load

def build_gem(tc: TrainConfig, tok) -> GEM:
    """Stage 0: a fresh VLM sized by the flags, or SigLIP + Qwen3 from local files (hf preset)."""
    ids = {k: v for k, v in D.special_ids(tok).items() if k in ("pad_id", "vision_start_id", "vision_end_id",
                                                               "image_pad_id")}
    if tc.hf_vision or tc.hf_llm or tc.preset == "hf":
        if not (tc.hf_vision and tc.hf_llm):
            die("the hf preset needs both --hf_vision=DIR and --hf_llm=DIR")
        # every shape, the image size and the pixel normalisation come from the checkpoints, not the flags
        gem = gem_from_hf(tc.hf_vision, tc.hf_llm, **ids)
        if tok.get_vocab_size() > gem.cfg.vocab_size:  # Qwen3: 151,669 tokens, 151,936 embedding rows
            die(f"{tc.hf_llm}/tokenizer.json: {tok.get_vocab_size()} tokens but config.json has vocab_size="
                f"{gem.cfg.vocab_size} (tokenizer of another model?)")
        return gem
    return GEM(dataclasses.replace(tc.model, **ids, vocab_size=tok.get_vocab_size()))


def build_head(tc: TrainConfig, gem: GEM, recipe: str) -> GenerativeHead:
    g, ratio = gem.cfg.grid, tc.head_size // gem.cfg.grid
    if tc.head_size % g or ratio < 1 or ratio & (ratio - 1):  # the generator halves head_size down to the token grid
        die(f"--head_size={tc.head_size}: must be the image-token grid ({g} per side) times a power of two, "
            f"e.g. {', '.join(str(g * 2 ** k) for k in range(1, 5))}")
    hc = DepthHeadConfig(llm_dim=gem.cfg.dim, cond_dim=tc.cond_dim, width=tc.head_width, grid=gem.cfg.grid,
                         out_size=tc.head_size, modality="rgb" if recipe == "rgb" else "depth",
                         objective="regress" if recipe == "regress" else "flow")
    return GenerativeHead(hc)


def load_head(head, tensors: dict, source: str) -> None:
    """The head's tensors are stored beside the VLM's under "head." (strict, shape-checked)."""
    load_tensors(head, {k[5:]: v for k, v in tensors.items() if k.startswith("head.")}, source)


def resolve_ckpt(path: str) -> str:
    """A run directory resolves to its final checkpoint (run.json "final"); a stage directory is itself."""
    run = os.path.join(path, "run.json")
    if not os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(run):
        with open(run) as f:
            return os.path.join(path, json.load(f)["final"])
    return path


def check_flow_convention(path: str) -> None:
    """A checkpoint with a generative head or an action expert must record the flow convention it was
    trained with; one from before the convention was unified (or another one) would sample backwards."""
    cfg_file = os.path.join(path, "config.json")
    with open(cfg_file) as f:
        found = json.load(f).get("flow_convention")
    if found != FLOW_CONVENTION:
        raise ValueError(f"{cfg_file}: flow_convention {found!r}, this code uses {FLOW_CONVENTION!r}: the heads "
                         f"would sample in the wrong direction; retrain this checkpoint with this version")


def load_pretrained(ckpt_dir: str, device="cpu"):
    """Load a pretraining checkpoint -> (gem, head or None, tokenizer, TrainConfig). Used by train_vla / eval.

    Layout: config.json (GEMConfig, so GEM.from_pretrained also works, plus the flow convention),
    pretrain.json (head config, training config, recipe, stage, git commit), model.safetensors (VLM keys
    vit./merger./llm., head keys head.), tokenizer.json, train_state.pt."""
    path = resolve_ckpt(ckpt_dir)
    meta_file = os.path.join(path, "pretrain.json")
    if not os.path.isfile(meta_file):
        raise FileNotFoundError(f"{meta_file}: missing (not a train_pretrain.py checkpoint?)")
    with open(meta_file) as f:
        meta = json.load(f)
    if meta.get("head") is not None:
        check_flow_convention(path)
    gem, extra = GEM.from_pretrained(path, return_extra=True)
    old = ("val_gen", "viz_every", "sample_steps", "cfg_scale")  # earlier versions' flags for what training printed and drew
    tc = config_from_dict(TrainConfig, {k: v for k, v in meta["train"].items() if k not in old}, meta_file)
    head = None
    if meta.get("head") is not None:
        head = GenerativeHead(config_from_dict(DepthHeadConfig, meta["head"], meta_file))
        load_head(head, extra, os.path.join(path, "model.safetensors"))
    tok = D.load_tokenizer(os.path.join(path, "tokenizer.json"))
    return gem.to(device), (head.to(device) if head is not None else None), tok, tc


def save_stage(path, gem, head, tc, tok_path, stage, step, opt, done, data_pos):
    extra = {f"head.{k}": v for k, v in head.state_dict().items()} if head is not None else None
    meta = dict(head=config_to_dict(head.cfg) if head is not None else None, train=config_to_dict(tc),
                recipe=tc.recipe, stage=stage, step=step, done=done, git_commit=git_commit())
    state = dict(stage=stage, step=step, done=done, data_position=data_pos, optimizer=opt.state_dict())
    gem.save_pretrained(path, extra_tensors=extra, flow_convention=FLOW_CONVENTION if head is not None else None,
                        json_files={"pretrain.json": meta}, copy_files={"tokenizer.json": tok_path}, train_state=state)


def trainable(gem: GEM, head, stage: int, head_trained: bool, log) -> list:
    """Set requires_grad for the stage (STAGES) and return the parameters the optimizer updates."""
    # >>> exercise: stage_freezing
    parts = set(STAGES[stage]["trains"])
    if stage == 1 and head is not None:
        log("stage 1: " + ("head loaded from --head_init: training the connector alone" if head_trained else
            "the head starts untrained (no --head_init), so stage 1 trains connector + generator"))
        if not head_trained:
            parts.add("generator")
    gem.requires_grad_("vlm" in parts)
    if head is not None:
        head.connector.requires_grad_("connector" in parts)
        head.generator.requires_grad_("generator" in parts)
    mods = [gem] + ([head] if head is not None else [])
    return [p for m in mods for p in m.parameters() if p.requires_grad]
    # <<< exercise


def text_ce_sum(logits, labels, per_sample: bool = False):
    """Summed next-token CE over assistant tokens (token t predicts t+1; -100 ignored). per_sample: each
    sample's CE is first averaged over its own answer tokens, so a one-token "yes" weighs as much as a
    60-token object list (with token averaging the short reasoning answers get ~5% of the gradient)."""
    lg, lab = logits[:, :-1].float(), labels[:, 1:]  # (B, T-1, V), (B, T-1)
    ce = F.cross_entropy(lg.reshape(-1, lg.size(-1)), lab.reshape(-1), ignore_index=-100, reduction="none")
    if not per_sample:
        return ce.sum()
    n = (lab != -100).sum(1)  # (B,) answer tokens per sample
    return (ce.view(lab.shape).sum(1) / n.clamp(min=1)).sum()


def text_count(labels, per_sample: bool = False) -> torch.Tensor:
    """What text_ce_sum sums over: answer tokens, or samples with at least one answer token."""
    mask = labels[:, 1:] != -100
    return (mask.any(1) if per_sample else mask).sum()


def sample_seeds(seed: int, stage: int, positions) -> list[int]:
    """Per-sample seeds of the flow noise, time and CFG drop, from each sample's global position in the
    stage's data stream: independent of how a step's batch is split over processes or micro-batches."""
    # torch's CPU generator keeps 32 bits of a seed: mix (seed, stage) into an offset, odd multiplier per position
    return [((seed * 31 + stage) * 0x9E3779B1 + int(p) * 0x85EBCA6B) % 2 ** 32 for p in positions]


class Bundle(nn.Module):
    """VLM + head as one module, so DDP sees one forward; returns the weighted loss to backpropagate."""

    def __init__(self, gem, head, stage, tc: TrainConfig):
        super().__init__()
        self.gem, self.head, self.stage, self.tc = gem, head, stage, tc

    def forward(self, b, w_text, w_flow):
        spec = STAGES[self.stage]
        use_text, use_flow = "text" in spec["losses"], "flow" in spec["losses"] and self.head is not None
        vlm_trains = "vlm" in spec["trains"]
        with (nullcontext() if vlm_trains else torch.no_grad()):  # frozen VLM: no graph, features only
            out = self.gem(b["input_ids"], b["pixel_values"], attention_mask=b["attention_mask"])
        zero = torch.zeros((), device=b["input_ids"].device)
        text_sum = flow = zero
        if use_text:  # summed CE: the caller's weight makes it a mean over the global batch's tokens / samples
            text_sum = text_ce_sum(out["logits"], b["labels"], self.tc.loss_norm == "sample")
        if use_flow:  # the noise of each sample's seed, drawn by the loader (host_batch) or here
            seeds = ((b["flow_t"], b["flow_noise"], b["flow_u"]) if "flow_noise" in b
                     else sample_seeds(self.tc.seed, self.stage, b["pos"]))
            flow = self.head.loss(out["image_hidden"].float(), b["target"], b["target_mask"], seeds)
        loss = gem_loss(self.stage, w_text * text_sum, w_flow * flow, self.tc.lam)
        return loss, text_sum.detach(), flow.detach()


def head_flops(head: GenerativeHead, c, cond_grad: bool, device) -> float:
    """The head's FLOPs per sample in a step (MFU): one blank sample through the eager head, fixed draws."""
    h = torch.zeros(1, c.n_image_tokens, c.dim, device=device, requires_grad=cond_grad)  # (1, N, D) image_hidden
    x0 = torch.zeros(1, head.cfg.channels, head.cfg.out_size, head.cfg.out_size, device=device)  # (1, C, S, S)
    draws = (torch.full((1,), 0.5), torch.zeros_like(x0), torch.ones(1))
    return layer_flops(head, lambda: head.loss(h, x0, None, draws))


# ----------------------------------------------------------------------------------------------------
# Data: the datasets' settings, the batches a stage trains on (the sampler and loader: data.StepItems), validation

def dataset_kw(tc: TrainConfig, gem: GEM, tok, **over) -> dict:
    """GemDataset's settings for a model and a run's TrainConfig (training, evaluation and the depth probe)."""
    return dict(tok=tok, image_size=gem.cfg.image_size, n_image_tokens=gem.cfg.n_image_tokens, head_size=tc.head_size,
                image_first=tc.image_first, max_len=tc.max_len, blind=tc.blind, cache=tc.cache,
                cache_root=tc.cache_dir or None, image_root=tc.image_root, depth_root=tc.depth_root) | over


def make_batch(ds, idx, pad_id, modality, device, items=None):
    """Collated batch on `device` (host_batch, then on_device) of dataset items ds[i] (or the given items)."""
    items = items if items is not None else [dict(ds[i], pos=i) for i in idx]
    return D.on_device(host_batch(items, pad_id, modality), device)


def host_batch(items: list, pad_id: int, modality: str, noise: tuple | None = None) -> dict:
    """Items -> a collated batch on the host (images uint8), plus the head's target ("target", depth or RGB),
    the pixels its loss trains ("target_mask": every RGB pixel; the depth pixels that have depth) and the
    samples with any ("target_valid"); noise=(seed, stage): also the flow's draws of each sample's seed
    (depth_head.draw_noise; ~2 ms per batch of 64 that the loader's workers take off the training thread)."""
    b = D.collate(items, pad_id, pixels=False)
    rgb = modality == "rgb"
    target = b["rgb_target"] if rgb else b["depth_target"]
    mask = torch.ones_like(b["depth_mask"]) if rgb else b["depth_mask"] & b["depth_valid"][:, None, None, None]
    # only the tensors training reads travel to the device (not the metric depth map, not the other target)
    keep = {k: v for k, v in b.items() if not torch.is_tensor(v) or k in ("input_ids", "labels", "attention_mask", "images")}
    keep |= dict(target=target, target_mask=mask, target_valid=mask.flatten(1).any(1))  # (B,): samples it counts
    if noise is not None:
        keep["flow_t"], keep["flow_noise"], keep["flow_u"] = draw_noise(target, sample_seeds(*noise, b["pos"]))
    return keep


def host_chunks(items: list, pad_id: int, modality: str, noise: tuple | None = None) -> list:
    """One micro-batch of items -> its length chunks as host batches (StepItems' collate in pretraining)."""
    return [host_batch(ch, pad_id, modality, noise) for ch in D.length_chunks(items)]


@torch.no_grad()
def validate(gem, head, ds, tc, stage, pad_id, device, amp):
    """Validation losses on a fixed spread sample of the split, with fixed flow noise and no CFG drop (the
    models are in eval mode), so curves are comparable (eval.py answers the questions and draws the depth).
    val_text_grey: the text loss with every image one grey image; at val_text, the model dropped its image."""
    modes = [(m, m.training) for m in (gem, head) if m is not None]
    for m, _ in modes:
        m.eval()
    losses = STAGES[stage]["losses"]
    modality = head.cfg.modality if head is not None else "depth"
    text_sum = n_tok = flow_sum = n_flow = grey_sum = 0.0
    idx = D.spread(len(ds), tc.val_batches * tc.batch_size)
    for s in range(0, len(idx), tc.batch_size):
        b = make_batch(ds, idx[s:s + tc.batch_size], pad_id, modality, device)
        with amp:
            out = gem(b["input_ids"], b["pixel_values"], attention_mask=b["attention_mask"])
            text_sum += text_ce_sum(out["logits"], b["labels"]).item()
            grey = gem(b["input_ids"], torch.full_like(b["pixel_values"], 128 / 127.5 - 1), attention_mask=b["attention_mask"])
            grey_sum += text_ce_sum(grey["logits"], b["labels"]).item()  # pixel value of grey 128 (data.to_pixel_values)
            n_tok += (b["labels"][:, 1:] != -100).sum().item()
            if head is not None and "flow" in losses:
                nv = b["target_valid"].sum().item()
                flow_sum += head.loss(out["image_hidden"].float(), b["target"], b["target_mask"],
                                      sample_seeds(1234, stage, b["pos"])).item() * nv
                n_flow += nv
    res = {"val_text": text_sum / max(n_tok, 1), "val_text_grey": grey_sum / max(n_tok, 1)}  # per answer token, any --loss_norm
    if n_flow:
        res["val_flow"] = flow_sum / n_flow
    for m, was in modes:
        m.train(was)
    return res


# ----------------------------------------------------------------------------------------------------
# One stage: the loop, and the helpers it calls once per step

def train_step(model, has_head, host, params, stage, step, tc, ddp, device, amp, ckpt):
    """Forward/backward over the step's micro-batches, gradient clipping and the NaN guard -> (terms, grad norm).
    The loss is a mean over the global batch: every token (or sample) for text, every valid image for flow.
    host: the micro-batches on the host (host_batch), counted there and moved to `device` one by one; the step
    reads from the GPU once, the losses and the gradient norm the NaN guard needs (inside the model, its shape
    checks and the flow noise's copies wait for the GPU briefly too)."""
    n_text = [float(text_count(b["labels"], tc.loss_norm == "sample")) for b in host]
    n_valid = [float(b["target_valid"].sum()) for b in host]
    counts = torch.tensor([sum(n_text), sum(n_valid)], dtype=torch.float64)
    counts = all_sum(counts.to(device), ddp).cpu() if ddp else counts  # the global batch's (DDP: every rank's)
    world = dist.get_world_size() if ddp else 1  # DDP averages gradients over ranks: the weights undo that
    w_text = world / max(float(counts[0]), 1.0)
    stats = torch.zeros(2, device=device)
    for m, h in enumerate(host):
        b = D.on_device(h, device)
        w_flow = world * n_valid[m] / max(float(counts[1]), 1.0)
        sync = nullcontext() if (not ddp or m == len(host) - 1) else model.no_sync()
        with sync:
            with amp:
                loss, text_sum, flow = model(b, w_text, w_flow)
            loss.backward()
        stats += torch.stack([text_sum.float(), flow.float() * n_valid[m]])
    gnorm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
    text, flow, gnorm = torch.cat([all_sum(stats, ddp), gnorm.float().reshape(1)]).tolist()  # the one wait
    losses = STAGES[stage]["losses"]
    terms = {"text": text / max(float(counts[0]), 1.0)} if "text" in losses else {}
    if "flow" in losses and has_head:
        terms["flow"] = flow / max(float(counts[1]), 1.0)
    terms["loss"] = gem_loss(stage, terms.get("text", 0.0), terms.get("flow", 0.0), tc.lam)
    if not (math.isfinite(terms["loss"]) and math.isfinite(gnorm)):  # stop before the update touches the weights
        die(f"non-finite loss at stage {stage} step {step} ({terms}, grad norm {gnorm}); stopping without saving; "
            f"last good checkpoint: {ckpt if os.path.isdir(ckpt) else 'none yet'}")
    return terms, gnorm


def after_step(stage, step, total, gem, head, val, tc, tok_path, ctx, opt, params, gbatch, amp):
    """Validation and checkpoints, each on its own schedule; -> True to stop (--stop_after)."""
    rank, device, log, logf, ckpt = ctx["rank"], ctx["device"], ctx["log"], ctx["logf"], ctx["ckpt"]
    last = step == total
    pad_id = D.special_ids(ctx["tok"])["pad_id"]
    if rank == 0 and ((tc.eval_every and step % tc.eval_every == 0) or last):
        res = validate(gem, head, val, tc, stage, pad_id, device, amp)
        logf(dict(stage=stage, step=step, **res))
    ctx["steps_run"] += 1
    stop = bool(tc.stop_after and ctx["steps_run"] >= tc.stop_after)
    if (tc.ckpt_every and step % tc.ckpt_every == 0) or last or stop:
        if not all(torch.isfinite(p).all() for p in params):
            die(f"non-finite parameters after stage {stage} step {step} (learning rate too high?); not saving; "
                f"last good checkpoint: {ckpt if os.path.isdir(ckpt) else 'none yet'}")
        if rank == 0:
            save_stage(ckpt, gem, head, tc, tok_path, stage, step, opt, last, step * gbatch)
        if ctx["ddp"]:
            dist.barrier()
    if stop:
        log(f"stage {stage}: stopping after {ctx['steps_run']} steps (--stop_after); continue with --resume")
    return stop


def run_stage(stage, gem, head, head_trained, tc, tok_path, ctx, resume_state):
    """Train one stage (STAGES[stage]) from step 0 or from resume_state -> True when the stage finished."""
    device, rank, world, ddp, log, logf = ctx["device"], ctx["rank"], ctx["world"], ctx["ddp"], ctx["log"], ctx["logf"]
    total, peak = getattr(tc, f"steps{stage}"), getattr(tc, f"lr{stage}")
    modality = head.cfg.modality if head is not None else "depth"
    pad_id = D.special_ids(ctx["tok"])["pad_id"]
    fams = [f for f in (tc.families0 if stage == 0 else tc.families).split(",") if f] or None
    make = lambda f: tuple(D.GemDataset(tc.data, split, scenes=D.parse_scenes(tc.scenes) if split == "train" else None,  # noqa: E731
                                        **dataset_kw(tc, gem, ctx["tok"], families=f)) for split in ("train", "val"))
    if ddp and rank:
        dist.barrier()  # rank 0 builds the decode-once caches; the others then read them (one build, not one per rank)
    ds, val = make(fams)
    if ddp and not rank:
        dist.barrier()
    if stage == 0 and not len(ds):  # data without a caption family (released GEM-250K): stage 0 trains on everything
        ds, val = make(None)
        log("stage 0: no caption records in the data: training on every record")
    one_file = tc.data.endswith(".jsonl")  # then both splits read (and skip in) the same file
    log(f"data: {tc.data}: train {len(ds)} records, val {len(val)}"
        + (f" (val = the records of every {D.HOLDOUT_EVERY}th image of the file)" if one_file else "")
        + f"; without depth (depth loss masked): {ds.no_depth} train, {val.no_depth} val"
        + "".join(f"; skipped ({why}): {n}" for why, n in sorted((ds.skipped if one_file else ds.skipped + val.skipped).items())))
    if ds.too_long[0] or val.too_long[0]:  # (DESIGN: a record over the cap is a warning with counts)
        log(f"warning: {ds.too_long[0]} train and {val.too_long[0]} val records are longer than --max_len={tc.max_len} "
            f"(the longest {max(ds.too_long[1], val.too_long[1])} tokens): left out, not cut; raise --max_len to keep them")
    if not len(ds):  # the data's fault, or the filters'
        die(f"--data={tc.data}: its train split holds no records" if not ds.n_read else
            f"--scenes={tc.scenes} --families={tc.families}: no train records left in {tc.data}")
    gc.freeze()  # the records live all run: the collector's rescans of them cost ~1/4 of the data path (bench_data.py)
    params = trainable(gem, head, stage, head_trained, log)
    # fused on a GPU: the update of every tensor in a few kernels instead of a dozen per tensor group
    opt = torch.optim.AdamW(params, lr=peak, betas=(0.9, 0.95), weight_decay=tc.weight_decay,
                            fused=device.type == "cuda")
    step = 0
    if resume_state is not None:
        for g in resume_state["optimizer"]["param_groups"]:  # this device decides fusing, not the file
            g["fused"] = device.type == "cuda"
        opt.load_state_dict(resume_state["optimizer"])
        step = resume_state["step"]
        log(f"stage {stage}: resumed at step {step}/{total}")
    model = Bundle(gem, head, stage, tc)
    if tc.compile:
        model = torch.compile(model)
    if ddp:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    ctx["ckpt"] = os.path.join(tc.out, f"stage{stage}")
    gbatch = tc.batch_size * tc.grad_accum * world
    n_params = sum(p.numel() for m in (gem, head) if m is not None for p in m.parameters())
    log(f"stage {stage}: {total} steps, lr {peak:g}, global batch {gbatch}, {len(ds)} train samples, "
        f"trains {sum(p.numel() for p in params):,} of {n_params:,} params")
    gem.train("vlm" in STAGES[stage]["trains"])
    if head is not None:
        head.train()
    from tqdm import tqdm
    bar = tqdm(total=total, initial=step, desc=f"stage {stage}", dynamic_ncols=True, disable=rank != 0)
    flow = head is not None and "flow" in STAGES[stage]["losses"]
    chunks = functools.partial(host_chunks, pad_id=pad_id, modality=modality,  # run by the loader's workers
                               noise=(tc.seed, stage) if flow else None)
    loader = D.step_loader(D.StepItems(ds, tc.seed + 17 * stage, step, total, gbatch, world, rank, tc.batch_size,
                                   tc.grad_accum, chunks), tc.workers, pin=device.type == "cuda")
    vlm_trains, peak_tf = "vlm" in STAGES[stage]["trains"], peak_tflops(device, tc.peak_tflops)
    head_per_sample = head_flops(head, gem.cfg, vlm_trains, device) if flow else 0.0
    t0, seen_s, seen_t, seen_f, speed = time.time(), 0, 0, 0.0, {}
    while step < total:
        lr = lr_at(step, total, peak, tc.warmup, tc.min_lr_frac)
        for g in opt.param_groups:
            g["lr"] = lr
        host = [b for mb in next(loader) for b in mb]  # the step's micro-batches (length chunks), collated by the loader
        terms, gnorm = train_step(model, head is not None, host, params, stage, step, tc, ddp, device, amp, ctx["ckpt"])
        n_samples = sum(len(b["input_ids"]) for b in host)
        seen_f += sum(vlm_flops(gem.cfg, b["attention_mask"], vlm_trains) for b in host) + head_per_sample * n_samples
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        seen_s += gbatch
        seen_t += int(sum(b["attention_mask"].sum() for b in host))  # this rank's; summed over ranks at the log
        bar.update(1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in terms.items() if k != "loss"} | speed, refresh=False)
        if step % tc.log_every == 0 or step == total:
            dt = time.time() - t0
            flops, seen_t = all_sum(torch.tensor([seen_f, seen_t], dtype=torch.float64, device=device), ddp).tolist()  # all ranks
            rec = dict(stage=stage, step=step, **terms, lr=lr, grad_norm=gnorm, samples_per_s=seen_s / dt,
                       step_ms=1000 * dt * gbatch / seen_s, tokens_per_s=seen_t / dt, tflops=flops / dt / 1e12,
                       time=time.time(), dt=dt)  # the window [time - dt, time]: reproduce sums runs that overlap
            speed = {"samples/s": f"{seen_s / dt:.0f}"}
            if peak_tf:
                rec["mfu"] = flops / dt / (peak_tf * 1e12 * world)
                speed["mfu"] = f"{rec['mfu']:.1%}"
            logf(rec)
            t0, seen_s, seen_t, seen_f = time.time(), 0, 0, 0.0
        if after_step(stage, step, total, gem, head, val, tc, tok_path, ctx, opt, params, gbatch, amp):
            break
    bar.close()
    return step == total


# ----------------------------------------------------------------------------------------------------
# Main: resolve the recipe, build or load models, run its stages, write run.json

def main(argv=None):
    tc = parse_config(TrainConfig, sys.argv[1:] if argv is None else argv, PRESETS)
    if tc.recipe not in RECIPES:
        die(f"unknown --recipe={tc.recipe!r}; valid: {', '.join(RECIPES)}")
    require(tc, batch_size=1, grad_accum=1, steps0=0, steps1=0, steps2=0, steps3=0, log_every=1, eval_every=0, val_batches=0,
            ckpt_every=0, max_len=1, head_size=1, workers=0, threads=0, stop_after=0)
    if tc.loss_norm not in ("token", "sample"):
        die(f"unknown --loss_norm={tc.loss_norm!r}; valid: token, sample")
    if tc.recipe != "base" and not tc.init:
        die(f"--recipe={tc.recipe} starts from a stage-0 checkpoint: pass --init=RUN_DIR (from --recipe=base)")
    if tc.blind and tc.recipe != "sft":
        die(f"--blind=true is the blind baseline of --recipe=sft (a text-only model), not of --recipe={tc.recipe}")
    if tc.head_init and tc.recipe in ("base", "sft"):
        die(f"--head_init makes no sense with --recipe={tc.recipe} (no depth head)")
    stages = RECIPES[tc.recipe]
    found = [s for s in stages if os.path.isdir(os.path.join(tc.out, f"stage{s}"))]
    if found and not tc.resume:
        die(f"{tc.out} already holds checkpoints ({', '.join(f'stage{s}' for s in found)}): "
            f"pass --resume to continue it, or choose another --out")
    made = not os.path.exists(tc.out)
    try:
        train(tc, stages)
    except BaseException as e:  # a run that fails before its first checkpoint leaves no folder it made
        if made and os.path.isdir(tc.out) and not any(n.startswith("stage") for n in os.listdir(tc.out)):
            shutil.rmtree(tc.out, ignore_errors=True)
        if isinstance(e, (ValueError, FileNotFoundError, KeyError)):  # bad files / checkpoints: one line naming the file
            die(str(e).strip("'\""))
        raise


def train(tc: TrainConfig, stages: list):
    device, rank, world, ddp = setup_dist(tc)
    os.makedirs(tc.out, exist_ok=True)
    logf, log = run_log(tc.out, rank)
    torch.manual_seed(tc.seed)
    if tc.recipe == "base":
        tok_path = os.path.join(tc.hf_llm or D.data_dir(tc.data), "tokenizer.json")  # hf: the Qwen3 tokenizer
        if not tc.hf_llm and not os.path.isfile(tok_path):  # data that brings no tokenizer (GEM-250K)
            tok_path = os.path.join(tc.out, "tokenizer.json")  # the data directory may be read-only
            if rank == 0 and not os.path.isfile(tok_path):  # (a resumed run keeps the one it trained)
                recs = D.split_records(tc.data, "train", tc.image_root, tc.depth_root)
                texts = [t["value"].replace(D.IMAGE, "") for r in recs for t in r["conversations"]]
                D.train_tokenizer(texts, tok_path, tc.model.vocab_size)
                log(f"no tokenizer.json beside {tc.data}: trained a {tc.model.vocab_size}-token BPE (--vocab_size) "
                    f"on its train text -> {tok_path}")
            if ddp:
                dist.barrier()  # rank 0 writes the file the others read
        tok = D.load_tokenizer(tok_path)
        gem, head = build_gem(tc, tok), None
        tc.model = gem.cfg  # record the model as built (vocab and token ids from the tokenizer; hf: the checkpoints')
    else:
        gem, _, tok, tc0 = load_pretrained(tc.init)
        tok_path = os.path.join(resolve_ckpt(tc.init), "tokenizer.json")
        if tc0.image_first != tc.image_first:
            log(f"note: --image_first={tc.image_first} differs from the stage-0 run ({tc0.image_first})")
        tc.model = gem.cfg  # later stages take every shape from --init: record the real ones
        torch.manual_seed(tc.seed)  # the head's initial weights are the same in every recipe
        head = None if tc.recipe == "sft" else build_head(tc, gem, tc.recipe)
    head_trained = False
    if tc.head_init:
        hpath = resolve_ckpt(tc.head_init)
        check_flow_convention(hpath)
        load_head(head, load_checkpoint(hpath)[0], os.path.join(hpath, "model.safetensors"))
        head_trained = True
    gem, head = gem.to(device), head.to(device) if head is not None else None
    record_run(tc.out, tc, {"val_batches", "cache"}, write=rank == 0, recipe=tc.recipe, stages=stages, final=f"stage{stages[-1]}",
               git_commit=git_commit(), world_size=world, device=str(device))
    ctx = dict(device=device, rank=rank, world=world, ddp=ddp, log=log, logf=logf, tok=tok, steps_run=0)
    for stage in stages:
        ck = os.path.join(tc.out, f"stage{stage}")
        state = None
        if tc.resume and os.path.isdir(ck):
            tensors, _, state = load_checkpoint(ck, with_train_state=True)
            src = os.path.join(ck, "model.safetensors")
            extra = load_tensors(gem, tensors, src)
            if head is not None:
                load_head(head, extra, src)
            if state is not None and state["done"]:
                log(f"stage {stage}: already finished ({ck}), skipping")
                head_trained = head is not None
                continue
        t = time.time()
        if not run_stage(stage, gem, head, head_trained, tc, tok_path, ctx, state):
            break  # --stop_after
        log(f"stage {stage}: done in {time.time() - t:.0f} s -> {ck}")
        head_trained = head is not None
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
