"""The `hf` preset end to end, on tiny random checkpoints written by transformers itself (CPU, ~10 s).

The test checkpoints copy the STRUCTURE of the real ones, not a convenient toy:
  Qwen3-0.6B   head_dim != hidden / heads (64 / 4 heads, head_dim 32), GQA (4 q / 2 kv heads), q/k-norm,
               tied embeddings, more embedding rows than tokenizer entries, special tokens AFTER the BPE
               vocabulary, Qwen's pre-tokenizer regex, <think> / </think> added tokens
  SigLIP-384   image_size not a multiple of the patch (384 / 14 -> 27 x 27; here 64 / 9 -> 7 x 7), so an
               ODD patch grid for the 2x2 merger, and a preprocessor_config.json with its own mean / std
Checks: the merger's padding against a loop over merged cells; the pixel normalisation against HF's image
processor + SiglipVisionModel; our chat encoding against Qwen3-0.6B's own chat template
(tests/fixtures/qwen3_chat_template.jinja); then train_pretrain.py --preset=hf (stage 0, then gem stages
1-3), eval.py vlm and train_vla.py on that checkpoint, run in-process through their main() as
tests/test_train_pretrain.py and tests/test_train_vla.py run them.
"""
import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data as D
import common as C
import eval as E
import hf as H
import model as M
import train_pretrain as TP
import train_vla as V

HERE = os.path.dirname(os.path.abspath(__file__))
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+")  # Qwen2/Qwen3 tokenizer.json's Split pre-tokenizer
MEAN, STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]  # not SigLIP's 0.5 / 0.5


def conversations(root, split="train"):
    with open(os.path.join(root, f"{split}.jsonl")) as f:
        return [json.loads(line)["conversations"] for line in f if line.strip()]


def qwen_style_tokenizer(path, texts):
    """A byte-level BPE laid out as Qwen3's tokenizer.json: NFC, Qwen's split regex, then the special tokens
    and <think> / </think> appended after the learned vocabulary (Qwen3: ids 151643...151668)."""
    from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors,
                            trainers)
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(["user\n", "assistant\n"] * 50 + list(texts), trainers.BpeTrainer(
        vocab_size=400, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens(D.SPECIAL_TOKENS)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")])
    tok.save(path)
    return tok


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory, micro_data):
    """(vision dir, llm dir): SiglipVisionModel + its image processor, Qwen3ForCausalLM + a Qwen-style
    tokenizer.json, all written by transformers' save_pretrained (safetensors)."""
    import transformers as tr  # a dev requirement: a missing one fails, never skips
    root = tmp_path_factory.mktemp("hf")
    vis, llm = str(root / "siglip"), str(root / "qwen3")
    torch.manual_seed(0)
    tr.SiglipVisionModel(tr.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=2, image_size=64, patch_size=9)).save_pretrained(vis)
    tr.SiglipImageProcessorPil(size={"height": 64, "width": 64}, image_mean=MEAN, image_std=STD).save_pretrained(vis)
    texts = [t["value"].replace(D.IMAGE, "") for conv in conversations(micro_data) for t in conv]
    os.makedirs(llm)
    tok = qwen_style_tokenizer(os.path.join(llm, "tokenizer.json"), texts)
    vocab = -(-tok.get_vocab_size() // 64) * 64  # Qwen3-0.6B: 151,669 tokens, 151,936 embedding rows
    tr.Qwen3ForCausalLM(tr.Qwen3Config(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                       tie_word_embeddings=True)).save_pretrained(llm)
    return vis, llm


# ---------------------------------------------------------------- odd patch grids

def merger_reference(m, x, side):
    """Merged token (i, j) by hand: the LayerNorm-ed patches (2i+a, 2j+b), a, b in {0, 1} row-major, a patch
    outside the side x side grid read as zeros, concatenated, then fc1 -> GELU -> fc2."""
    B, N, D = x.shape
    normed = F.layer_norm(x, (D,), m.norm.weight, m.norm.bias, m.norm.eps)
    g = (side + 1) // 2
    out = torch.zeros(B, g * g, m.fc2.out_features)
    for b in range(B):
        for i in range(g):
            for j in range(g):
                parts = [normed[b, r * side + c] if r < side and c < side else torch.zeros(D)
                         for r, c in ((2 * i, 2 * j), (2 * i, 2 * j + 1), (2 * i + 1, 2 * j), (2 * i + 1, 2 * j + 1))]
                out[b, i * g + j] = m.fc2(F.gelu(m.fc1(torch.cat(parts))))
    return out


@pytest.mark.parametrize("side", [7, 6, 3])
def test_merger_pads_odd_grids_like_a_loop_over_cells(side):
    torch.manual_seed(0)
    m = M.Merger(vit_dim=6, llm_dim=5)
    with torch.no_grad():  # a LayerNorm bias: zeros padded BEFORE the norm would show up as that bias
        m.norm.weight.uniform_(0.5, 1.5)
        m.norm.bias.normal_()
    x = torch.randn(2, side * side, 6)
    with torch.no_grad():
        assert torch.allclose(m(x), merger_reference(m, x, side), atol=1e-6)
    # one grid everywhere: the config, the GEM's image tokens and the depth head's condition grid
    cfg = M.GEMConfig(**dict(M.MODEL_PRESETS["micro"], image_size=9 * side, patch_size=9))
    g = (side + 1) // 2
    assert cfg.grid == g and cfg.n_image_tokens == g * g
    assert M.GEMConfig(image_size=384, patch_size=14).grid == 14  # SigLIP-so400m-384: 27 x 27 patches
    gem = M.GEM(cfg).eval()
    ids = torch.full((2, g * g + 4), 7)
    ids[:, 2:2 + g * g] = cfg.image_pad_id
    with torch.no_grad():
        assert gem(ids, torch.rand(2, 3, 9 * side, 9 * side) * 2 - 1)["image_hidden"].shape == (2, g * g, cfg.dim)
    tc = TP.parse_config(TP.TrainConfig, ["--preset=micro", f"--head_size={4 * g}"], TP.PRESETS)
    assert TP.build_head(tc, gem, "gem").cfg.grid == g


def test_vlm_flops_count_the_padded_cells(monkeypatch):
    """vlm_flops == torch's FlopCounterMode on a GEM with a 7 x 7 patch grid (the merger runs on 4 x 4 cells)."""
    from torch.utils.flop_counter import FlopCounterMode
    monkeypatch.setattr(M, "SDPA", False)  # torch's counter does not see SDPA's CPU kernel
    torch.manual_seed(0)
    cfg = M.GEMConfig(**dict(M.MODEL_PRESETS["micro"], image_size=63, patch_size=9, vocab_size=50))
    gem = M.GEM(cfg)
    ids = torch.full((2, 24), 9)
    ids[:, 1:1 + cfg.n_image_tokens] = cfg.image_pad_id
    mask = torch.ones_like(ids, dtype=torch.bool)
    with FlopCounterMode(display=False) as fc:
        gem(ids, torch.rand(2, 3, 63, 63), attention_mask=mask)
    assert C.vlm_flops(cfg, mask, trains=False) == pytest.approx(fc.get_total_flops(), rel=1e-9)


# ---------------------------------------------------------------- image size and normalisation

def test_siglip_normalisation_from_the_checkpoint(hf_dirs, tmp_path, capsys):
    """Our [-1, 1] pixels through the loaded encoder == HF's SiglipVisionModel on the pixels HF's own image
    processor makes from the same uint8 images with the checkpoint's mean / std."""
    import transformers as tr
    vis, llm = hf_dirs
    ours = H.load_hf_siglip_vision(vis).eval()
    assert ours.cfg.image_size == 64 and ours.cfg.image_mean == pytest.approx(tuple(MEAN))
    assert ours.cfg.image_std == pytest.approx(tuple(STD))
    ref, proc = tr.SiglipVisionModel.from_pretrained(vis).eval(), tr.SiglipImageProcessorPil.from_pretrained(vis)
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    px = proc(images=list(images), return_tensors="pt")["pixel_values"]
    mine = D.to_pixel_values(torch.from_numpy(images).permute(0, 3, 1, 2))
    with torch.no_grad():
        want = ref(pixel_values=px).last_hidden_state
        assert torch.allclose(ours.features(mine), want, atol=1e-4)
        assert not torch.allclose(ours.features(mine), ref(pixel_values=mine).last_hidden_state, atol=1e-2)
    # the GEM records them; its checkpoints keep them
    gem = H.gem_from_hf(vis, llm)
    assert gem.cfg.image_mean == ours.cfg.image_mean
    assert (gem.cfg.image_size, gem.cfg.patch_size, gem.cfg.grid) == (64, 9, 4)
    gem.save_pretrained(tmp_path / "ck")
    again = M.GEM.from_pretrained(str(tmp_path / "ck")).eval()
    with torch.no_grad():
        assert torch.allclose(again.vit.features(mine), want, atol=1e-4)
    # no preprocessor_config.json: SigLIP's usual 0.5 / 0.5, and the loader says so
    bare = tmp_path / "bare"
    shutil.copytree(vis, bare)
    os.remove(bare / "preprocessor_config.json")
    assert H.load_hf_siglip_vision(str(bare)).cfg.image_std == (0.5, 0.5, 0.5)
    assert "preprocessor_config.json missing" in capsys.readouterr().out
    # a processor size that disagrees with the position table: a one-line error naming the file
    cfg = json.load(open(os.path.join(vis, "preprocessor_config.json")))
    json.dump(dict(cfg, size={"height": 56, "width": 56}), open(bare / "preprocessor_config.json", "w"))
    with pytest.raises(ValueError, match=r"preprocessor_config\.json: size 56x56 but config\.json has image_size=64"):
        H.load_hf_siglip_vision(str(bare))


def test_checkpoints_without_the_normalisation_fields_load(tmp_path):
    torch.manual_seed(0)
    gem = M.GEM(M.GEMConfig(**M.MODEL_PRESETS["micro"])).eval()
    gem.save_pretrained(tmp_path / "old")
    cfg_file = tmp_path / "old" / "config.json"
    cfg = json.load(open(cfg_file))
    json.dump({k: v for k, v in cfg.items() if k not in ("image_mean", "image_std")}, open(cfg_file, "w"))
    old = M.GEM.from_pretrained(str(tmp_path / "old")).eval()
    px = torch.rand(2, 3, 32, 32) * 2 - 1
    assert old.cfg.image_mean == (0.5, 0.5, 0.5)
    with torch.no_grad():
        assert torch.equal(old.vit.features(px), gem.vit.features(px))  # 0.5 / 0.5 is exactly the identity


# ---------------------------------------------------------------- tokenizer and chat template

def test_chat_encoding_equals_qwen3_chat_template(hf_dirs, micro_data):
    """data.encode_chat / encode_prompt == Qwen3-0.6B's chat template through transformers'
    apply_chat_template on the same turns, for every micro train record. The template cannot render image
    items, so `<image>` is replaced by the Qwen-VL run as Qwen-VL's fine-tuning code does; the empty think
    block it writes before the last answer is removed (we train without it: data.encode_chat)."""
    import transformers as tr
    _, llm = hf_dirs
    tok = D.load_tokenizer(os.path.join(llm, "tokenizer.json"))
    template = open(os.path.join(HERE, "fixtures", "qwen3_chat_template.jinja")).read()
    hf = tr.PreTrainedTokenizerFast(tokenizer_file=os.path.join(llm, "tokenizer.json"), chat_template=template)
    n = 16
    run = "<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>"
    think = "<think>\n\n</think>\n\n"
    convs = conversations(micro_data)
    assert any(len(c) == 1 for c in convs) and any(len(c) == 2 for c in convs)  # image-only (depth) and Q/A turns
    for conv in convs:
        msgs = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"].replace(D.IMAGE, run)}
                for t in conv]
        text = hf.apply_chat_template(msgs, tokenize=False)
        if len(conv) > 1:
            assert text.count(think) == 1  # what we leave out, and only that
        want = hf(text.replace(think, ""), add_special_tokens=False)["input_ids"]
        ids, labels = D.encode_chat(tok, conv, n)
        assert ids == want, text
        if len(conv) > 1:  # the loss covers the answer and its <|im_end|>, nothing else
            answer = hf(conv[1]["value"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
            assert [x for x in labels if x != -100] == answer
            prompt = hf.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
            assert D.encode_prompt(tok, conv[0]["value"], n) == hf(prompt, add_special_tokens=False)["input_ids"]
    assert len(convs) > 50 and tok.token_to_id("<|endoftext|>") > 300  # special ids after the vocabulary


# ---------------------------------------------------------------- the hf preset end to end

def test_hf_preset_end_to_end(hf_dirs, micro_data, micro_demos, tmp_path):
    vis, llm = hf_dirs
    small = ["--preset=hf", f"--data={micro_data}", "--batch_size=4", "--grad_accum=1", "--workers=0", "--threads=1",
             "--log_every=1", "--eval_every=0", "--val_batches=1", "--ckpt_every=0", "--max_len=128",
             "--head_width=16", "--cond_dim=16", "--head_size=16"]
    n = torch.get_num_threads()
    try:
        base, gem_run = str(tmp_path / "base"), str(tmp_path / "gem")
        TP.main(small + ["--recipe=base", f"--hf_vision={vis}", f"--hf_llm={llm}", f"--out={base}", "--steps0=2"])
        gem, head, tok, tc = TP.load_pretrained(base)
        c = gem.cfg  # the checkpoints' shapes, image size and normalisation, not the preset's
        assert (c.image_size, c.patch_size, c.grid, c.head_dim, c.n_heads, c.n_kv_heads) == (64, 9, 4, 32, 4, 2)
        assert c.image_mean == pytest.approx(tuple(MEAN)) and c.tie_embeddings and head is None
        copied, qwen = (open(os.path.join(d, "tokenizer.json")).read() for d in (os.path.join(base, "stage0"), llm))
        assert copied == qwen
        assert D.special_ids(tok)["image_pad_id"] == gem.cfg.image_pad_id > 300
        TP.main(small + ["--recipe=gem", f"--init={base}", f"--out={gem_run}", "--steps1=1", "--steps2=1",
                         "--steps3=2"])
        gem, head, tok, tc = TP.load_pretrained(gem_run)
        assert head.cfg.grid == 4
        logs = [json.loads(line) for line in open(os.path.join(gem_run, "log.jsonl"))]
        last = [r for r in logs if r.get("stage") == 3 and "loss" in r][-1]
        assert last["step"] == 2 and np.isfinite(last["loss"]) and np.isfinite(last["flow"])
        res = E.main(["vlm", f"--ckpt={gem_run}", f"--out={tmp_path / 'eval'}", "--depth_frames=4", "--probe_steps=5",
                      "--sample_steps=2", "--max_new_tokens=24", "--max_questions=8"])
        assert res["all"] and {"own head", "probe"} <= set(res["depth"])
        assert os.path.isfile(tmp_path / "eval" / "results.md") and os.path.isfile(tmp_path / "eval" / "depth_own_head.png")
        vla = str(tmp_path / "vla")
        V.main([f"--init={gem_run}", f"--demos={micro_demos}", f"--out={vla}", "--preset=micro", "--steps=2",
                "--threads=1"])
    finally:
        torch.set_num_threads(n)
    pol = V.Policy(vla)
    from sim_env import TabletopEnv
    obs, _ = TabletopEnv("goal", 0).reset(options={"start_id": 0})
    a = pol.act(obs)
    assert a.shape == (7,) and np.isfinite(a).all()
