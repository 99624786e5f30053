"""Exercise vit_block (model.ViTBlock.forward): the pre-norm SigLIP block, swapped into the reference and
checked against a stored snapshot of outputs and gradients (teach/snapshots/vit_block.safetensors), plus properties.
model.attention is replaced by the oracle's, so only this exercise's code is graded."""
import pytest
import torch

import model as M
import snapshots
from oracles import attention_fast


@pytest.fixture(autouse=True)
def _reference_attention(monkeypatch):
    monkeypatch.setattr(M, "attention", attention_fast)


def _block():
    blk = M.ViTBlock(M.GEMConfig(vit_dim=32, vit_heads=2, vit_mlp=64))
    snapshots.randomise(blk, 3)
    return blk


def test_shapes_and_finite():
    x = torch.randn(2, 9, 32)
    y = _block()(x)
    assert y.shape == x.shape and torch.isfinite(y).all(), f"ViTBlock: {tuple(y.shape)}, want (B, N, D) = {tuple(x.shape)}"


def test_matches_snapshot():
    want = snapshots.load("vit_block")
    got = snapshots.vit_block(want["state"], want["inputs"])
    snapshots.compare("ViTBlock", got, want, hint="post-norm instead of pre-norm (x + f(norm(x))), heads split in the "
                      "wrong order from the fused qkv (view as (B, N, 3, heads, hd)), exact GELU instead of tanh")


def test_patches_are_a_set():
    """No causal mask, no positions inside the block: permuting the patches permutes the output."""
    blk, x = _block(), torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(0))
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = blk(x)[:, perm], blk(x[:, perm])
    assert torch.allclose(a, b, atol=1e-5), "ViTBlock: attention over patches is bidirectional (no causal mask)"


def test_residual_stream():
    """With both output projections zeroed the block is the identity: the residuals add to the unnormed x."""
    blk = _block()
    with torch.no_grad():
        blk.proj.weight.zero_(), blk.proj.bias.zero_(), blk.fc2.weight.zero_(), blk.fc2.bias.zero_()
        x = torch.randn(2, 9, 32)
        assert torch.allclose(blk(x), x, atol=1e-6), "ViTBlock: x + attn(norm1(x)), then + mlp(norm2(x)): pre-norm residuals"
