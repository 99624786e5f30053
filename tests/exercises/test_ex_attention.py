"""Exercise attention (model.attention): GQA attention through SDPA (and the plain softmax path), graded
against a per-head loop oracle and causality / masking properties, on both paths (model.SDPA)."""
import pytest
import torch

import model as M
from oracles import attention_loop

PATHS = pytest.mark.parametrize("sdpa", [True, False], ids=["sdpa", "plain"])


def _qkv(B=2, H=4, KV=2, T=5, S=5, hd=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, T, hd, generator=g), torch.randn(B, KV, S, hd, generator=g),
            torch.randn(B, KV, S, hd, generator=g))


def test_shapes_and_finite():
    q, k, v = _qkv()
    y = M.attention(q, k, v)
    assert y.shape == q.shape, f"attention: output {tuple(y.shape)}, want (B, H, T, hd) = {tuple(q.shape)}"
    assert torch.isfinite(y).all()


@PATHS
def test_full_attention_matches_loop(monkeypatch, sdpa):
    monkeypatch.setattr(M, "SDPA", sdpa)
    q, k, v = _qkv(H=2, KV=2)
    err = (M.attention(q, k, v) - attention_loop(q, k, v)).abs().max()
    assert err < 1e-5, f"attention: max error {err:.3g} against softmax(q k^T / sqrt(hd)) v"


@PATHS
def test_gqa_groups_query_heads(monkeypatch, sdpa):
    monkeypatch.setattr(M, "SDPA", sdpa)
    q, k, v = _qkv(H=6, KV=2)
    y, want = M.attention(q, k, v), attention_loop(q, k, v)
    if not torch.allclose(y, want, atol=1e-5):
        tiled = attention_loop(q, k.repeat(1, 3, 1, 1)[:, [0, 2, 4, 1, 3, 5]], v.repeat(1, 3, 1, 1)[:, [0, 2, 4, 1, 3, 5]])
        if torch.allclose(y, tiled, atol=1e-5):
            raise AssertionError("attention: query head h must read kv head h // (H // KV) (repeat_interleave: heads "
                                 "0,1,2 share kv 0), not h % KV (repeat / tile)")
        raise AssertionError(f"attention (GQA, H=6, KV=2): max error {(y - want).abs().max():.3g}")


@PATHS
def test_causal_prefill(monkeypatch, sdpa):
    monkeypatch.setattr(M, "SDPA", sdpa)
    q, k, v = _qkv(T=6, S=6)
    y = M.attention(q, k, v, is_causal=True)
    err = (y - attention_loop(q, k, v, is_causal=True)).abs().max()
    assert err < 1e-5, f"attention (is_causal): max error {err:.3g}; token t sees tokens 0..t, itself included"
    v2 = v.clone()
    v2[:, :, 3:] += 10.0  # the future of tokens 0..2
    assert torch.allclose(M.attention(q, k, v2, is_causal=True)[:, :, :3], y[:, :, :3], atol=1e-5), \
        "attention (is_causal): tokens 0..2 changed when tokens 3.. changed: the causal mask is off by one"


@PATHS
def test_boolean_mask(monkeypatch, sdpa):
    """mask (B, 1, T, S), True = attend: masked keys have no influence at all."""
    monkeypatch.setattr(M, "SDPA", sdpa)
    q, k, v = _qkv(T=3, S=6)
    mask = torch.ones(2, 1, 3, 6, dtype=torch.bool)
    mask[0, 0, :, :2] = False
    mask[1, 0, 1, 4] = False
    y = M.attention(q, k, v, mask=mask)
    assert torch.allclose(y, attention_loop(q, k, v, mask=mask), atol=1e-5), "attention: the boolean mask (True = attend)"
    v2 = v.clone()
    v2[0, :, :2] = 100.0
    assert torch.allclose(M.attention(q, k, v2, mask=mask)[0], y[0], atol=1e-5), "attention: masked keys leaked"
