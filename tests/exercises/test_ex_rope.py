"""Exercise rope (model.rope): graded against a complex-number oracle and RoPE's properties."""
import torch

import model as M
from inputs import rope_tables
from oracles import rope_complex, rope_interleaved


def _x(B=2, H=3, T=7, hd=16, seed=0):
    return torch.randn(B, H, T, hd, generator=torch.Generator().manual_seed(seed))


def test_shapes_and_finite():
    x = _x()
    cos, sin = rope_tables(7, 16)
    y = M.rope(x, cos, sin)
    assert y.shape == x.shape and y.dtype == x.dtype, f"rope: shape {tuple(y.shape)} / {y.dtype}, want {tuple(x.shape)}"
    assert torch.isfinite(y).all()


def test_matches_complex_rotation():
    x = _x()
    cos, sin = rope_tables(7, 16)
    y, want = M.rope(x, cos, sin), rope_complex(x, cos, sin)
    if not torch.allclose(y, want, atol=1e-5):
        if torch.allclose(y, rope_interleaved(x, cos, sin), atol=1e-4):
            raise AssertionError("rope: you rotated interleaved pairs (x[2i], x[2i+1]); this model (Qwen/Llama, "
                                 "Hugging Face weights) pairs x[i] with x[i + hd/2] ('rotate half')")
        if torch.allclose(y, rope_complex(x, cos, -sin), atol=1e-5):
            raise AssertionError("rope: rotated the wrong way (by -angle): the rotated half is (-x2, x1), not (x2, -x1)")
        raise AssertionError(f"rope: max error {(y - want).abs().max():.3g} against the complex rotation "
                             f"(x[i] + 1j x[i + hd/2]) * exp(1j angle_i)")


def test_position_zero_is_identity():
    x = _x(T=1)
    cos, sin = rope_tables(1, 16)
    assert torch.allclose(M.rope(x, cos, sin), x, atol=1e-6), "rope: at position 0 (angle 0) x must come back unchanged"


def test_preserves_norm_of_each_pair():
    x = _x()
    cos, sin = rope_tables(7, 16, offset=5)
    y = M.rope(x, cos, sin)
    pairs = lambda z: z[..., :8] ** 2 + z[..., 8:] ** 2  # noqa: E731
    assert torch.allclose(pairs(y), pairs(x), atol=1e-4), "rope: a rotation keeps |(x[i], x[i + hd/2])| for every i"


def test_scores_depend_only_on_relative_position():
    """<rope(q, m), rope(k, n)> is a function of m - n: shift both positions by 11, the scores stay."""
    q, k = _x(T=5, seed=1), _x(T=5, seed=2)
    c0, s0 = rope_tables(5, 16)
    c1, s1 = rope_tables(5, 16, offset=11)
    a = M.rope(q, c0, s0) @ M.rope(k, c0, s0).transpose(-2, -1)
    b = M.rope(q, c1, s1) @ M.rope(k, c1, s1).transpose(-2, -1)
    assert torch.allclose(a, b, atol=1e-4), "rope: q.k after RoPE must depend on the position difference only"
