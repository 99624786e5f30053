"""Exercise cross_attention (train_vla.ExpertBlock.context and ActionExpert.context): block i of the action
expert cross-attends to the VLM's layer i, padding masked. Checked against a stored snapshot
(teach/snapshots/cross_attention.safetensors) and by which layers and positions the output depends on."""
import torch

import snapshots
import train_vla as V


def _expert_and_inputs():
    want = snapshots.load("cross_attention")
    ex = V.ActionExpert(n_blocks=2, dim=16, heads=2, ctx_dim=24, horizon=4, action_dim=7, state_dim=8, mlp_ratio=2.0)
    ex.load_state_dict(want["state"])
    return ex, want["inputs"]


def _run(ex, inp, hidden):
    with torch.no_grad():
        return ex(inp["x_t"], inp["t"], inp["state"], ex.context(list(hidden), inp["mask"]))


def test_shapes_and_finite():
    ex, inp = _expert_and_inputs()
    ctx = ex.context(list(inp["hidden"]), inp["mask"])
    assert len(ctx) == 2, f"ActionExpert.context: one entry per block (2), got {len(ctx)}"
    k, v, m = ctx[0]
    assert k.shape == (2, 2, 6, 8) and v.shape == (2, 2, 6, 8), f"context K/V: {tuple(k.shape)}, want (B, heads, L, hd)"
    out = _run(ex, inp, inp["hidden"])
    assert out.shape == (2, 4, 7) and torch.isfinite(out).all()


def test_matches_snapshot():
    want = snapshots.load("cross_attention")
    got = snapshots.cross_attention(want["state"], want["inputs"])
    snapshots.compare("cross_attention", got, want, hint="block i reads hidden_states[i] (the embeddings are layer 0); "
                      "the ctx_norm before the K/V projection; padding as -inf in an additive (B, 1, 1, L) mask")


def test_block_i_reads_layer_i():
    """2 blocks, 3 hidden states: layers 0 and 1 matter, layer 2 does not."""
    ex, inp = _expert_and_inputs()
    base = _run(ex, inp, inp["hidden"])
    moved = []
    for layer in range(3):
        h = inp["hidden"].clone()
        h[layer] += torch.randn(h[layer].shape, generator=torch.Generator().manual_seed(layer))
        moved.append(bool((_run(ex, inp, h) - base).abs().max() > 1e-5))
    assert moved == [True, True, False], (f"cross_attention: changing layer 0/1/2 changes the output: {moved}, want "
                                          "[True, True, False]: block i cross-attends to hidden_states[i]")


def test_padding_is_ignored():
    ex, inp = _expert_and_inputs()
    base = _run(ex, inp, inp["hidden"])
    h = inp["hidden"].clone()
    h[:, 1, 4:] += 50.0  # the padded positions of sample 1
    assert torch.allclose(_run(ex, inp, h), base, atol=1e-5), "cross_attention: padded VLM positions (mask False) leaked"
