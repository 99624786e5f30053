"""Exercise llm_block (model.Attention.forward and model.Block.forward): the Qwen3 decoder layer with q/k-norm,
RoPE, GQA and the KV cache, swapped into a 2-layer reference LanguageModel and checked against a stored
snapshot (teach/snapshots/llm_block.safetensors: full, left-padded and cached forwards, all gradients).
model.rope and model.attention are replaced by the oracle's, so only this exercise's code is graded."""
import pytest
import torch

import model as M
import snapshots
from oracles import attention_fast, rope_complex

HINT = ("q/k-norm must come BEFORE RoPE; split the fused qkv as (B, T, H + 2 KV, hd); cache.update(layer, k, v) "
        "returns all keys so far; pre-norm residuals")


@pytest.fixture(autouse=True)
def _reference_rope_attention(monkeypatch):
    monkeypatch.setattr(M, "attention", attention_fast)
    monkeypatch.setattr(M, "rope", rope_complex)


def _lm(seed=3):
    lm = M.LanguageModel(M.GEMConfig(**snapshots.LLM))
    snapshots.randomise(lm, seed)
    return lm


def test_shapes_and_finite():
    lm = _lm()
    h, hidden = lm(torch.randint(0, 40, (2, 6)), output_hidden_states=True)
    assert h.shape == (2, 6, 32) and len(hidden) == 3 and torch.isfinite(h).all(), f"LanguageModel: {tuple(h.shape)}"


def test_full_forward_and_gradients_match_snapshot():
    want = snapshots.load("llm_block")
    got = snapshots.llm_block(want["state"], want["inputs"])
    keys = ["full"] + [k for k in want if k.startswith("grad.")]
    snapshots.compare("llm_block (full forward)", got, want, keys, HINT)


def test_left_padded_forward_matches_snapshot():
    want = snapshots.load("llm_block")
    got = snapshots.llm_block(want["state"], want["inputs"])
    snapshots.compare("llm_block (left padding)", got, want, ["padded"], HINT)


def test_cached_decoding_matches_snapshot():
    want = snapshots.load("llm_block")
    got = snapshots.llm_block(want["state"], want["inputs"])
    snapshots.compare("llm_block (KV cache: prefill 5, then 1 + 1)", got, want, ["cached"],
                      "with a cache, attend to cache.update(...)'s keys/values (everything so far), not only the new ones")


def test_cache_equals_full_forward():
    lm, ids = _lm(), torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full, _ = lm(ids)
        cache = M.KVCache(lm.cfg, 2, 8, "cpu", torch.float32)
        parts = [lm(ids[:, :3], cache=cache)[0]] + [lm(ids[:, i:i + 1], cache=cache)[0] for i in range(3, 8)]
    err = (torch.cat(parts, 1) - full).abs().max()
    assert err < 1e-4, f"llm_block: cached decoding differs from the full forward by {err:.3g}"
