"""GEM-VLA: a flow-matching action expert on the (depth-supervised) GEM VLM, its training, and the Policy.

Run (CPU, tiny):  python train_vla.py --preset=tiny --init=runs/tiny/seed0/gem --demos=data/tiny-demos --out=runs/tiny/vla_gem
  no depth loss: --depth_weight=0   frozen VLM: --freeze_vlm   one task: --tasks=goal:6   continue: --resume
  several GPUs:  torchrun --nproc_per_node=N train_vla.py --preset=small ...      every flag: --help
Use the policy:   pol = Policy("runs/tiny/vla_gem"); pol.reset(); action = pol.act(obs)    # obs from sim_env
Output: <out>/run.json, log.jsonl (action, depth, loss, lr, samples/s; val_action_l1), ckpt/ = a pretraining-style
checkpoint (config.json, model.safetensors with VLM + "head." + "expert." tensors, pretrain.json, tokenizer.json)
plus vla.json and norm_stats.json; train_pretrain.load_pretrained reads it too (VLM + head).

Paper -> code map (PAPER.md, "GEM-VLA")
  RDT-style DiT expert, AdaLN on flow time + state      ActionExpert (adaLN-single), ExpertBlock
  block i cross-attends to VLM layer i (embedding = 0)  ActionExpert.context: K/V of hidden_states[i], padding masked
  rectified flow on the action chunk, t logit-normal   flow_matching_loss (depth_head.flow_pair: ONE convention
    (paper: x_t = t a + (1-t) eps; ours, as the depth     for both heads: x_t = (1-t) a + t eps, velocity eps - a,
    head: t -> 1-t, the same path run backwards)          noise at t = 1)
  5 Euler steps at inference                            ActionExpert.sample -> depth_head.euler_sample (--flow_steps)
  L = L_action + 0.1 L_flow(depth), first camera        GEMVLA.forward (--depth_weight; 0 = no depth term)
  VLM trains jointly at its own lr (or frozen)          build_optimizer (--vlm_lr, --freeze_vlm)
  action chunk, executed k of H then re-planned         Policy.act / act_batch (--replan_k)
Toy-scale choices: chunk H=8 (paper 32); 4 expert blocks of width 128 (paper 14 of 1024); no GQA/SwiGLU/registers;
several (t, noise) draws per VLM forward (--flow_repeats); depth loss on part of each batch (--depth_batch).
"""
from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data as D
from common import (all_sum, config_from_dict, config_to_dict, die, git_commit, load_checkpoint, layer_flops,
                    lr_at, parse_config, peak_tflops, record_run, require, run_log, setup_dist, vlm_flops)
from depth_head import FLOW_CONVENTION, euler_sample, flow_pair, timestep_embedding
from model import RMSNorm, load_tensors
from train_pretrain import check_flow_convention, load_pretrained, resolve_ckpt


# ----------------------------------------------------------------------------------------------------
# Action expert: a small DiT over [state token, H action tokens]

def modulate(x, shift, scale):  # AdaLN: x (B,T,D), shift/scale (B,D)
    return x * (1 + scale[:, None]) + shift[:, None]


class ExpertBlock(nn.Module):
    """Self-attention over the action tokens, cross-attention to one VLM layer, MLP; each AdaLN-Zero gated."""

    def __init__(self, dim: int, heads: int, ctx_dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(dim, elementwise_affine=False) for _ in range(3))
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.ctx_norm = RMSNorm(ctx_dim)  # intermediate LLM layers are un-normalised residual streams
        self.q, self.kv, self.xproj = nn.Linear(dim, dim), nn.Linear(ctx_dim, 2 * dim), nn.Linear(dim, dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.mod_table = nn.Parameter(torch.zeros(9 * dim))  # this block's offset to the shared modulation

    def split(self, x):  # (B, T, D) -> (B, heads, T, hd)
        B, T, D = x.shape
        return x.view(B, T, self.heads, D // self.heads).transpose(1, 2)

    def context(self, h, mask):
        """VLM hidden states (B, L, C) + mask (B, L) -> cached K, V (B, heads, L, hd) and attention mask."""
        # >>> exercise: cross_attention
        k, v = self.kv(self.ctx_norm(h)).chunk(2, dim=-1)
        bias = torch.zeros(mask.shape, dtype=k.dtype, device=k.device).masked_fill(~mask, float("-inf"))
        return self.split(k), self.split(v), bias[:, None, None, :]  # additive mask (B,1,1,L): -inf = padding
        # <<< exercise

    def forward(self, x, mod, ctx):
        """x (B, 1+H, D); mod (B, 9D) = shared AdaLN shift/scale/gate for the three sub-layers."""
        B, T, D = x.shape
        s1, c1, g1, s2, c2, g2, s3, c3, g3 = (mod + self.mod_table).chunk(9, dim=-1)
        q, k, v = self.qkv(modulate(self.norm1(x), s1, c1)).chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(self.split(q), self.split(k), self.split(v))  # (B, heads, T, hd)
        x = x + g1[:, None] * self.proj(y.transpose(1, 2).reshape(B, T, D))
        ck, cv, cmask = ctx
        y = F.scaled_dot_product_attention(self.split(self.q(modulate(self.norm2(x), s2, c2))), ck, cv, attn_mask=cmask)
        x = x + g2[:, None] * self.xproj(y.transpose(1, 2).reshape(B, T, D))
        return x + g3[:, None] * self.mlp(modulate(self.norm3(x), s3, c3))


class ActionExpert(nn.Module):
    """Predicts the flow velocity (eps - a) of a normalised action chunk (B, H, A) at time t (paper: RDT DiT).

    Tokens: [state token, H noisy action tokens] + learned positions. Conditioning: AdaLN on
    emb(t) + mlp(state). Block i cross-attends to VLM hidden_states[i] (embedding output = layer 0).
    """

    def __init__(self, n_blocks: int, dim: int, heads: int, ctx_dim: int, horizon: int, action_dim: int = 7,
                 state_dim: int = 8, mlp_ratio: float = 4.0):
        super().__init__()
        self.horizon, self.action_dim, self.dim = horizon, action_dim, dim
        self.action_in, self.state_in = nn.Linear(action_dim, dim), nn.Linear(state_dim, dim)
        self.pos = nn.Parameter(torch.randn(1, horizon + 1, dim) * 0.02)
        self.t_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.s_mlp = nn.Sequential(nn.Linear(state_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(ExpertBlock(dim, heads, ctx_dim, mlp_ratio) for _ in range(n_blocks))
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False)
        # adaLN-single (PixArt-alpha): one modulation (9 D) for all blocks plus a learned per-block offset, instead
        # of a D x 9D linear per block: those weights would dominate the expert's size and its batch-1 latency
        self.ada, self.out = nn.Linear(dim, 11 * dim), nn.Linear(dim, action_dim)
        for m in (self.ada, self.out):  # AdaLN-Zero: blocks start as identity, the initial velocity is 0
            nn.init.zeros_(m.weight), nn.init.zeros_(m.bias)

    def context(self, hidden_states: list, mask):
        """Per-block cross-attention K/V, computed once per observation and reused by every Euler step."""
        # >>> exercise: cross_attention
        return [blk.context(hidden_states[i], mask) for i, blk in enumerate(self.blocks)]
        # <<< exercise

    def forward(self, x_t, t, state, ctx):
        """x_t (B,H,A), t (B,), state (B,S), ctx from context() -> velocity (B,H,A)."""
        c = F.silu(self.t_mlp(timestep_embedding(t, self.dim)) + self.s_mlp(state))  # (B, D)
        mod, mod_out = self.ada(c).split([9 * self.dim, 2 * self.dim], dim=-1)  # (B, 9D) blocks, (B, 2D) output
        x = torch.cat([self.state_in(state)[:, None], self.action_in(x_t)], dim=1) + self.pos  # (B, 1+H, D)
        for blk, kv in zip(self.blocks, ctx):
            x = blk(x, mod, kv)
        shift, scale = mod_out.chunk(2, dim=-1)
        return self.out(modulate(self.norm_out(x[:, 1:]), shift, scale))  # drop the state token: (B, H, A)

    @torch.no_grad()
    def sample(self, state, ctx, steps: int = 5, generator=None):
        """Euler integration from noise (t = 1) to actions (t = 0) -> (B, H, A) normalised."""
        noise = torch.randn(state.shape[0], self.horizon, self.action_dim, generator=generator, device=state.device)
        return euler_sample(lambda x, t: self.forward(x, t, state, ctx), noise, steps)


def flow_matching_loss(expert, ctx, actions, state, action_mask, repeats: int = 1, t_mu: float = 0.0,
                       t_sigma: float = 1.0, generator=None):
    """Rectified flow on the chunk (depth_head.flow_pair): x_t = (1-t) a + t eps, regress eps - a, with
    t = sigmoid(N(mu, sigma)) (logit-normal; t_mu > 0 puts more weight near the noise end).

    actions (B,H,A) normalised, state (B,S), action_mask (B,H) bool (False past the episode end).
    `repeats` draws several (t, eps) per sample: the VLM forward is shared, so this is nearly free.
    """
    # >>> exercise: flow_loss
    if repeats > 1:  # (B, ...) -> (B * repeats, ...), each sample's copies adjacent
        ctx = [tuple(z.repeat_interleave(repeats, 0) for z in kv) for kv in ctx]
        actions, state, action_mask = (z.repeat_interleave(repeats, 0) for z in (actions, state, action_mask))
    B = actions.shape[0]
    noise = torch.randn(actions.shape, generator=generator, device=actions.device)
    t = torch.sigmoid(t_mu + t_sigma * torch.randn(B, generator=generator, device=actions.device))
    x_t, v = flow_pair(actions, noise, t)
    err = (expert(x_t, t, state, ctx) - v).pow(2).mean(-1)  # (B, H)
    m = action_mask.float()
    return (err * m).sum() / m.sum().clamp(min=1.0)
    # <<< exercise


# ----------------------------------------------------------------------------------------------------
# Config and presets (one screen of hyperparameters)

@dataclass
class VLAConfig:
    preset: str = "tiny"
    init: str = ""                  # pretraining run or stage directory (train_pretrain.py), required
    demos: str = "data/demos"       # demo episodes (python sim_data.py demos ...)
    out: str = "runs/tiny/vla"      # run directory: run.json, log.jsonl, ckpt/
    resume: bool = False            # continue <out>/ckpt exactly (model, optimizer, step; data order and noise are per-step seeded)
    tasks: str = ""                 # "goal" (a suite), "spatial:0,goal:3" (tasks): train on those only; "" = every demo
    # action expert (paper: RDT DiT, width 1024, 14 blocks, chunk 32)
    horizon: int = 8                # H actions per chunk
    expert_dim: int = 128
    expert_heads: int = 4
    expert_blocks: int = 4          # block i <- VLM hidden_states[i] (paper: the first 14 of 29); 0 = all
    expert_mlp_ratio: float = 4.0
    flow_steps: int = 5             # Euler steps at inference
    flow_repeats: int = 4           # (t, noise) draws per sample and step; the VLM forward is shared
    t_mu: float = 0.0               # logit-normal flow time: t = sigmoid(N(t_mu, t_sigma))
    t_sigma: float = 1.0
    replan_k: int = 4               # the Policy executes k of the H actions, then re-plans
    # optimisation
    steps: int = 500
    batch_size: int = 16            # global batch (split over DDP ranks)
    lr: float = 2e-3                # action expert
    vlm_lr: float = 3e-4            # VLM and depth head when trained jointly (paper: 1e-5 at 2B)
    freeze_vlm: bool = False
    depth_weight: float = 0.1       # L = L_action + depth_weight * L_flow(depth); 0 = no depth term at all
    depth_batch: int = 4            # depth loss on the first n samples of each (shuffled) batch; 0 = all
    weight_decay: float = 0.01
    warmup: float = 0.05            # fraction of the steps
    min_lr_frac: float = 0.1        # cosine decays to this fraction of the peak
    grad_clip: float = 1.0
    val_episodes: int = 1           # demo episodes per task held out for the validation action L1
    val_max: int = 128              # at most this many validation chunks (evenly spaced)
    # bookkeeping
    log_every: int = 10
    eval_every: int = 250
    ckpt_every: int = 250
    seed: int = 0
    device: str = "auto"            # auto | cpu | cuda
    compile: bool = False
    peak_tflops: float = 0.0        # MFU denominator per GPU; 0 = from the GPU's name (common.PEAK_BF16_TFLOPS)
    threads: int = 0                # torch CPU threads (0 = torch's default)
    workers: int = 0                # processes loading the next steps' samples (a GPU step outruns one core's data path)
    render_workers: int = 0         # processes rendering the demo frame cache once (data.build_demo_cache; 0 = every core)
    cache_dir: str = ""             # where that cache goes when the demos folder is read-only ("" = <demos>/cache)
    stop_after: int = 0             # stop (with a checkpoint) after this many steps of this invocation; 0 = never


PRESETS = {
    "micro": dict(horizon=4, expert_dim=32, expert_heads=2, expert_blocks=0, steps=6, batch_size=4, depth_batch=0,
                  flow_repeats=2, log_every=1, eval_every=3, ckpt_every=3, val_max=8),
    "tiny": dict(),
    # small: one GPU; 5,000 steps of batch 64 = ~6 epochs of 50 demos x 40 tasks, ~16 PFLOP (train_pretrain's small note)
    "small": dict(horizon=16, expert_dim=384, expert_heads=6, expert_blocks=7, steps=5000, batch_size=64, depth_batch=0,
                  lr=3e-4, vlm_lr=3e-5, replan_k=8, eval_every=1000, ckpt_every=1000, log_every=50, val_max=1024, workers=2),
}


# ----------------------------------------------------------------------------------------------------
# GEM-VLA = VLM (+ generative depth head for the auxiliary loss) + action expert

class GEMVLA(nn.Module):
    def __init__(self, vlm, expert: ActionExpert, head=None):
        super().__init__()
        self.vlm, self.expert, self.head = vlm, expert, head  # head is None when depth_weight == 0

    def encode(self, input_ids, pixel_values, attention_mask):
        """One VLM forward -> (its output dict, the expert's per-block cross-attention context)."""
        out = self.vlm(input_ids, pixel_values, attention_mask=attention_mask, output_hidden_states=True)
        return out, self.expert.context(out["hidden_states"], attention_mask)

    def forward(self, batch: dict, cfg: VLAConfig) -> dict:
        """Loss terms of one batch: action flow loss and (only if a head is attached) the depth flow loss."""
        out, ctx = self.encode(batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
        terms = {"action": flow_matching_loss(self.expert, ctx, batch["actions"], batch["state"], batch["action_mask"],
                                              cfg.flow_repeats, cfg.t_mu, cfg.t_sigma)}
        if self.head is not None:  # paper: the depth loss (x0.1) stays on, on the first camera's image
            n = cfg.depth_batch or len(batch["depth_valid"])  # the batch is shuffled: a subset is unbiased
            terms["depth"] = self.head.loss(out["image_hidden"][:n], batch["depth_target"][:n], batch["depth_valid"][:n])
        terms["loss"] = terms["action"] + cfg.depth_weight * terms["depth"] if "depth" in terms else terms["action"]
        return terms

    def grad_layers(self) -> int:
        """LLM layers the loss back-propagates through: all when the depth head reads the last one, else those
        up to the expert's last block (block i reads hidden state i; hidden state 0 = the embeddings)."""
        return self.vlm.cfg.n_layers if self.head is not None else len(self.expert.blocks) - 1

    @torch.no_grad()
    def sample_actions(self, batch: dict, steps: int, generator=None):
        """Normalised action chunks (B, H, A) for a batch of preprocessed observations."""
        _, ctx = self.encode(batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
        return self.expert.sample(batch["state"], ctx, steps, generator)


# ----------------------------------------------------------------------------------------------------
# Building, saving and loading (checkpoint layout: DESIGN.md section 3)

def build_expert(cfg: VLAConfig, gcfg) -> ActionExpert:
    n_hidden = gcfg.n_layers + 1  # embedding output + every LLM layer
    n_blocks = cfg.expert_blocks or n_hidden
    if n_blocks > n_hidden:
        die(f"--expert_blocks={n_blocks} but the VLM has only {n_hidden} hidden states (embedding + {gcfg.n_layers} layers)")
    return ActionExpert(n_blocks, cfg.expert_dim, cfg.expert_heads, gcfg.dim, cfg.horizon,
                        mlp_ratio=cfg.expert_mlp_ratio)


def save_vla(path, model: GEMVLA, cfg: VLAConfig, pre_tc, stats: dict, tok_path: str, train_state=None):
    """A pretraining-style checkpoint (config.json = GEMConfig, pretrain.json, VLM + "head." tensors, so
    train_pretrain.load_pretrained and eval's depth probe read it too) plus "expert." tensors, vla.json
    and norm_stats.json."""
    extra = {f"expert.{k}": v for k, v in model.expert.state_dict().items()}
    if model.head is not None:
        extra.update({f"head.{k}": v for k, v in model.head.state_dict().items()})
    meta = dict(head=config_to_dict(model.head.cfg) if model.head is not None else None, train=config_to_dict(pre_tc),
                recipe="vla", init=cfg.init, git_commit=git_commit())
    model.vlm.save_pretrained(path, extra_tensors=extra, train_state=train_state, flow_convention=FLOW_CONVENTION,
                              json_files={"pretrain.json": meta, "vla.json": config_to_dict(cfg), "norm_stats.json": stats},
                              copy_files={"tokenizer.json": tok_path})


def load_vla(path: str, device="cpu"):
    """VLA run or checkpoint directory -> (GEMVLA, VLAConfig, pretraining TrainConfig, tokenizer, norm stats)."""
    path = resolve_ckpt(path)
    files = {n: os.path.join(path, n) for n in ("vla.json", "norm_stats.json")}
    for n, f in files.items():
        if not os.path.isfile(f):
            die(f"{f}: missing (not a train_vla.py checkpoint?)")
    check_flow_convention(path)  # the expert's, even when the VLM has no head
    vlm, head, tok, pre_tc = load_pretrained(path)
    with open(files["vla.json"]) as f:
        cfg = config_from_dict(VLAConfig, json.load(f), files["vla.json"])
    with open(files["norm_stats.json"]) as f:
        stats = json.load(f)
    model = GEMVLA(vlm, build_expert(cfg, vlm.cfg), head)
    tensors, _, _ = load_checkpoint(path)
    load_tensors(model.expert, {k[7:]: v for k, v in tensors.items() if k.startswith("expert.")},
                 os.path.join(path, "model.safetensors"))
    return model.to(device), cfg, pre_tc, tok, stats


# ----------------------------------------------------------------------------------------------------
# Policy: simulator observation -> action, through the training preprocessing and an action queue

class Policy:
    """Closed-loop controller. `act(obs)` returns one 7-D action in [-1, 1]; it predicts a chunk of H
    actions, executes the first `replan_k` of them, then re-plans from the new observation.

    Policy(ckpt).act(obs) for one environment; reset(n) + act_batch([obs or None] * n) for n in lockstep
    (one batched VLM + expert call for every environment whose queue ran out; None = finished env).
    """

    def __init__(self, ckpt: str, device="cpu", replan_k: int | None = None, flow_steps: int | None = None, seed=0):
        self.model, self.cfg, self.pre_tc, self.tok, self.stats = load_vla(ckpt, device)
        self.model.eval()
        self.pad_id, self.device = D.special_ids(self.tok)["pad_id"], torch.device(device)
        self.k = replan_k or self.cfg.replan_k
        self.steps = flow_steps or self.cfg.flow_steps
        if not 1 <= self.k <= self.cfg.horizon:
            die(f"replan_k={self.k}: must be in 1..horizon={self.cfg.horizon}")
        self.generator = torch.Generator(self.device).manual_seed(seed)  # reproducible rollouts
        g = self.model.vlm.cfg  # what obs_to_inputs needs, exactly as DemoDataset passes it in training
        self.obs_cfg = SimpleNamespace(image_size=g.image_size, n_image_tokens=g.n_image_tokens,
                                       image_first=self.pre_tc.image_first)
        self.reset()

    def reset(self, n: int = 1):
        self.queues = [[] for _ in range(n)]

    def preprocess(self, obs: dict) -> dict:
        """THE training preprocessing (data.obs_to_inputs), one sample."""
        return D.obs_to_inputs(obs, self.tok, self.obs_cfg, self.stats)

    @torch.no_grad()
    def predict(self, obs_list: list) -> np.ndarray:
        """Observations -> un-normalised action chunks (N, H, 7) clipped to [-1, 1]."""
        batch = D.device_batch([self.preprocess(o) for o in obs_list], self.pad_id, self.device)
        a = self.model.sample_actions(batch, self.steps, self.generator)
        return D.unnormalize(a.float().cpu(), self.stats, "action").clamp(-1, 1).numpy()

    def act_batch(self, obs_list: list) -> list:
        need = [i for i, o in enumerate(obs_list) if o is not None and not self.queues[i]]
        if need:
            chunks = self.predict([obs_list[i] for i in need])
            for i, c in zip(need, chunks):
                self.queues[i] = list(c[:self.k])
        return [self.queues[i].pop(0) if o is not None else None for i, o in enumerate(obs_list)]

    def act(self, obs: dict) -> np.ndarray:
        if len(self.queues) != 1:
            self.reset(1)
        return self.act_batch([obs])[0]


# ----------------------------------------------------------------------------------------------------
# Training

def build_optimizer(model: GEMVLA, cfg: VLAConfig, fused: bool = False):
    """Expert at --lr; VLM and depth head at --vlm_lr (or VLM frozen). No weight decay on norms/biases."""
    model.vlm.requires_grad_(not cfg.freeze_vlm)
    groups = []
    for mods, lr in (([model.expert], cfg.lr), ([model.vlm, model.head], cfg.vlm_lr)):
        ps = [p for m in mods if m is not None for p in m.parameters() if p.requires_grad]
        groups += [dict(params=[p for p in ps if p.dim() >= 2], peak=lr, weight_decay=cfg.weight_decay),
                   dict(params=[p for p in ps if p.dim() < 2], peak=lr, weight_decay=0.0)]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.95), fused=fused)


def split_demos(ds, tasks: str, val_episodes: int):
    """Dataset indices -> (train, val): keep --tasks ("goal" = a whole suite, "spatial:3" = one task, comma
    separated; "" = all), and hold out each task's last `val_episodes` episodes."""
    try:
        keep = [(t.split(":")[0], int(t.split(":")[1]) if ":" in t else None) for t in tasks.split(",") if t]
    except ValueError:
        die(f"--tasks={tasks!r}: expected suite or suite:task_id items, e.g. goal or spatial:0,goal:3")
    by_task = {}
    for e, ep in enumerate(ds.eps):
        if not keep or any(ep["suite"] == s and tid in (None, ep["task_id"]) for s, tid in keep):
            by_task.setdefault((ep["suite"], ep["task_id"]), []).append(e)
    for s, tid in keep:
        if not any(s == bs and tid in (None, bt) for bs, bt in by_task):
            die(f"--tasks: no demos for {s}{'' if tid is None else f':{tid}'} in {os.path.dirname(ds.files[0])}")
    val_eps = {e for eps in by_task.values() for e in (eps[-val_episodes:] if 0 < val_episodes < len(eps) else [])}
    train_eps = {e for eps in by_task.values() for e in eps} - val_eps
    return ([i for i, (e, _) in enumerate(ds.index) if e in train_eps], [i for i, (e, _) in enumerate(ds.index) if e in val_eps])


@torch.no_grad()
def validate(model: GEMVLA, ds, idx: list, cfg: VLAConfig, stats: dict, pad_id: int, device, bs: int = 64) -> float:
    """Mean |sampled - demo| action (un-normalised: action units) over held-out demo chunks."""
    model.eval()
    g = torch.Generator(device).manual_seed(1234)  # the same noise every time: comparable numbers
    err = cnt = 0.0
    for s in range(0, len(idx), bs):
        b = D.device_batch([ds[i] for i in idx[s:s + bs]], pad_id, device)
        pred = D.unnormalize(model.sample_actions(b, cfg.flow_steps, g).float(), stats, "action")
        true = D.unnormalize(b["actions"].float(), stats, "action")
        m = b["action_mask"].float()[..., None]  # (B, H, 1): no error past the episode end
        err += ((pred - true).abs() * m).sum().item()
        cnt += m.sum().item() * pred.shape[-1]
    model.train()
    return err / max(cnt, 1.0)


def main(argv=None):
    cfg = parse_config(VLAConfig, sys.argv[1:] if argv is None else argv, PRESETS)
    if not cfg.init:
        die("--init is required: a pretraining run or stage directory from train_pretrain.py")
    require(cfg, batch_size=1, steps=1, horizon=1, flow_steps=1, flow_repeats=1, replan_k=1, log_every=1, eval_every=0,
            ckpt_every=0, depth_batch=0, val_episodes=0, val_max=0, workers=0, threads=0, stop_after=0)
    if not os.path.isdir(cfg.demos):
        die(f"--demos={cfg.demos}: no such directory (expert demos: python sim_data.py demos --out=DIR)")
    device, rank, world, ddp = setup_dist(cfg)
    if cfg.batch_size % world:
        die(f"--batch_size={cfg.batch_size} is not divisible by the {world} DDP processes")
    ckpt = os.path.join(cfg.out, "ckpt")
    if os.path.isdir(ckpt) and not cfg.resume:
        die(f"{ckpt} exists: pass --resume to continue it, or choose another --out")
    logf, log = run_log(cfg.out, rank)

    # the VLM (and its generative head) from pretraining; the tokenizer travels with the checkpoint
    torch.manual_seed(cfg.seed)  # the expert's initial weights
    try:
        vlm, head, tok, pre_tc = load_pretrained(cfg.init)
    except (ValueError, FileNotFoundError) as e:  # not a checkpoint: one line naming the file
        die(f"--init={cfg.init}: {str(e).strip(chr(39))}")
    tok_path = os.path.join(resolve_ckpt(cfg.init), "tokenizer.json")
    if cfg.depth_weight > 0 and head is None:
        die(f"--depth_weight={cfg.depth_weight} but {cfg.init} has no generative head (an sft/base VLM): use 0")
    if head is not None and cfg.depth_weight > 0 and head.cfg.modality != "depth":
        die(f"--depth_weight: the head of {cfg.init} generates {head.cfg.modality!r}, not depth")
    model = GEMVLA(vlm, build_expert(cfg, vlm.cfg), head if cfg.depth_weight > 0 else None).to(device)
    pad_id = D.special_ids(tok)["pad_id"]

    # demos: the last --val_episodes episodes of every task are held out for the validation action L1; the
    # normalisation statistics come from the training episodes of the selected tasks only
    if ddp and rank:
        torch.distributed.barrier()  # rank 0 renders the demo frame cache; the others then read it
    ds = D.DemoDataset(cfg.demos, tok, vlm.cfg.image_size, cfg.horizon, head.cfg.out_size if head else 32,
                       vlm.cfg.n_image_tokens, image_first=pre_tc.image_first, stats={},
                       workers=cfg.render_workers or os.cpu_count() or 1, cache_root=cfg.cache_dir or None)
    if ddp and not rank:
        torch.distributed.barrier()
    train_idx, val_idx = split_demos(ds, cfg.tasks, cfg.val_episodes)
    val_idx = val_idx[::max(1, math.ceil(len(val_idx) / cfg.val_max))]
    if not train_idx:
        die(f"{cfg.demos}: no training chunks (--tasks={cfg.tasks!r}, --val_episodes={cfg.val_episodes})")
    stats = ds.stats = D.norm_stats([ds.eps[e] for e in sorted({ds.index[i][0] for i in train_idx})])

    os.makedirs(cfg.out, exist_ok=True)  # only now: a bad input leaves no folder behind
    record_run(cfg.out, cfg, {"render_workers"}, write=rank == 0, recipe="vla", final="ckpt", init=cfg.init,
               git_commit=git_commit(), world_size=world, device=str(device))  # a changed run is refused here
    opt = build_optimizer(model, cfg, fused=device.type == "cuda")  # fused on a GPU: the update in a few kernels
    step = 0
    if cfg.resume and os.path.isdir(ckpt):
        done, _, _, _, stats = load_vla(ckpt)  # a resumed run keeps the statistics its weights were trained with
        ds.stats = stats
        model.load_state_dict(done.state_dict())
        state = load_checkpoint(ckpt, with_train_state=True)[2]
        if state is None:
            die(f"{ckpt}: no train_state.pt to resume from")
        for g in state["optimizer"]["param_groups"]:  # this device decides fusing, not the file
            g["fused"] = device.type == "cuda"
        opt.load_state_dict(state["optimizer"])
        step = int(state["step"])
    net = model
    if cfg.compile:
        net = torch.compile(net)
    if ddp:  # find_unused: the expert may read only the first layers, so the last ones get no gradient
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                                  find_unused_parameters=True)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    n_exp, n_vlm = (sum(p.numel() for p in m.parameters()) for m in (model.expert, model.vlm))
    if rank == 0:
        msg = (f"VLA: expert {n_exp / 1e6:.2f}M params ({len(model.expert.blocks)} blocks <- VLM layers 0.."
               f"{len(model.expert.blocks) - 1}), VLM {n_vlm / 1e6:.2f}M {'frozen' if cfg.freeze_vlm else 'trained'}, "
               f"depth loss {'x%g' % cfg.depth_weight if model.head is not None else 'off'}; {len(train_idx)} train / "
               f"{len(val_idx)} val chunks" + (f"; resumed at step {step}" if step else ""))
        log(msg)
    from tqdm import tqdm
    bar = tqdm(total=cfg.steps, initial=step, desc="vla", dynamic_ncols=True, disable=rank != 0)
    model.train()
    t0, seen, stop = time.time(), 0, cfg.steps if not cfg.stop_after else min(cfg.steps, step + cfg.stop_after)
    # MFU: the VLM's FLOPs from the batch's real tokens; the expert's and head's counted by hooks on the first batch
    seen_f, per_sample, peak_tf, last_log = 0.0, None, peak_tflops(device, cfg.peak_tflops), step
    # this rank's samples of each step, as in pretraining (a stateless sampler: resume stays exact)
    loader = D.step_loader(D.StepItems(torch.utils.data.Subset(ds, train_idx), cfg.seed, step, cfg.steps, cfg.batch_size,
                                   world, rank, cfg.batch_size // world, 1,
                                   functools.partial(D.collate, pad_id=pad_id, pixels=False)),
                         cfg.workers, pin=device.type == "cuda")
    while step < stop:
        lr_scale = lr_at(step, cfg.steps, 1.0, cfg.warmup, cfg.min_lr_frac)
        for g in opt.param_groups:
            g["lr"] = g["peak"] * lr_scale
        # data order and flow noise are pure functions of (seed, step, rank): resume continues exactly
        torch.manual_seed(cfg.seed * 1_000_003 + step * 101 + rank)
        host = next(loader)[0]  # collated by the loader; counted here without waiting for the GPU
        b = D.on_device(host, device)
        if per_sample is None:  # the expert's and head's FLOPs: one extra forward of the eager model, once
            with amp:
                per_sample = layer_flops(nn.ModuleList([m for m in (model.expert, model.head) if m is not None]),
                                         lambda: model(b, cfg)) / len(host["input_ids"])
        with amp:
            terms = net(b, cfg)
        seen_f += (vlm_flops(model.vlm.cfg, host["attention_mask"], not cfg.freeze_vlm, model.grad_layers(), text_grad=False)
                   + per_sample * len(host["input_ids"]))
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        gnorm = torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.grad_clip)
        names = sorted(terms)
        *vals, gnorm = torch.cat([all_sum(torch.stack([terms[k].detach().float() for k in names]), ddp) / world,
                                  gnorm.float().reshape(1)]).tolist()  # the step's one wait for the GPU
        vals = dict(zip(names, vals))
        if not all(math.isfinite(v) for v in [gnorm, *vals.values()]):  # NaN guard: stop before the weights go bad
            die(f"non-finite loss or gradient at step {step} ({vals}, grad norm {gnorm}); stopping without saving; "
                f"last good checkpoint: {ckpt if os.path.isdir(ckpt) else 'none yet'}")
        opt.step()
        step, seen = step + 1, seen + cfg.batch_size
        bar.update(1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in vals.items() if k != "loss"}, refresh=False)
        last = step == cfg.steps
        if step % cfg.log_every == 0 or last:
            dt = time.time() - t0
            flops = all_sum(torch.tensor(seen_f, dtype=torch.float64, device=device), ddp).item()  # all ranks
            rec = dict(step=step, **vals, lr=opt.param_groups[0]["lr"], grad_norm=gnorm, samples_per_s=seen / dt,
                       step_ms=1000 * dt / (step - last_log), tflops=flops / dt / 1e12, time=time.time(), dt=dt)
            if peak_tf:
                rec["mfu"] = flops / dt / (peak_tf * 1e12 * world)
            logf(rec)
            t0, seen, seen_f, last_log = time.time(), 0, 0.0, step
        if rank == 0 and val_idx and ((cfg.eval_every and step % cfg.eval_every == 0) or last):
            l1 = validate(model, ds, val_idx, cfg, stats, pad_id, device)
            logf(dict(step=step, val_action_l1=l1))
            bar.write(f"step {step}: val action L1 {l1:.4f} ({len(val_idx)} held-out chunks)")
        if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or last or step == stop:
            if rank == 0:
                save_vla(ckpt, model, cfg, pre_tc, stats, tok_path, train_state=dict(step=step, optimizer=opt.state_dict()))
            if ddp:
                torch.distributed.barrier()
    bar.close()
    if ddp:
        torch.distributed.destroy_process_group()
    return model


if __name__ == "__main__":
    main()
