"""Exercise depth_target (data.depth_target): GEM's target = 1 - normalised inverse depth, graded against a
by-hand oracle (sorted percentiles, block means) and the properties that name the usual mistakes."""
import numpy as np
import torch

import data as D
from oracles import block_mean, percentile_linear


def _depth(seed=0, H=32, W=32):
    """A tilted floor with a box in front: depths 0.4 .. 3 m, smooth with a step."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W] / max(H, W)
    d = 0.6 + 2.2 * (1 - yy) + 0.3 * xx + 0.05 * rng.random((H, W))
    d[8:16, 10:20] = 0.45 + 0.02 * rng.random((8, 10))
    return d


def _oracle(d, size):
    valid = (d > 0) & np.isfinite(d)
    inv = np.where(valid, 1.0 / np.where(valid, d, 1.0), 0.0)
    lo, hi = percentile_linear(inv[valid], 2), percentile_linear(inv[valid], 98)
    x = 1.0 - np.minimum(np.maximum((inv - lo) / (hi - lo), 0.0), 1.0)
    num, den = block_mean(np.where(valid, x, 0.0), size), block_mean(valid.astype(float), size)
    return np.where(den > 0, num / np.maximum(den, 1e-12), 1.0)


def test_shapes_and_finite():
    t = D.depth_target(_depth(), 16)
    assert tuple(t.shape) == (1, 16, 16), f"depth_target: {tuple(t.shape)}, want (1, size, size) = (1, 16, 16)"
    assert t.dtype == torch.float32 and torch.isfinite(t).all()
    assert t.min() >= 0 and t.max() <= 1, "depth_target: values must lie in [0, 1]"


def test_matches_oracle():
    d = _depth()
    t, want = D.depth_target(d, 16)[0].double().numpy(), _oracle(d, 16)
    assert np.abs(t - want).max() < 1e-5, (f"depth_target: max error {np.abs(t - want).max():.3g} against "
                                            "1 - clip((1/d - p2) / (p98 - p2)), percentiles of 1/d, area resize")


def test_near_is_zero_far_is_one():
    d = _depth()
    t = D.depth_target(d, 32)[0].numpy()
    near, far = np.unravel_index(d.argmin(), d.shape), np.unravel_index(d.argmax(), d.shape)
    assert t[near] < 0.05 and t[far] > 0.95, (f"depth_target: nearest pixel {t[near]:.2f} (want 0), farthest "
                                              f"{t[far]:.2f} (want 1): the target is 1 - normalised INVERSE depth")


def test_is_affine_in_inverse_depth():
    """Between the percentiles the target is a straight line in 1/d (not in d): fit it on the unclipped pixels."""
    d = _depth()
    t = D.depth_target(d, 32)[0].double().numpy().ravel()
    inv, keep = 1.0 / d.ravel(), (t > 0.02) & (t < 0.98)
    A = np.stack([inv[keep], np.ones(keep.sum())], 1)
    resid = t[keep] - A @ np.linalg.lstsq(A, t[keep], rcond=None)[0]
    assert np.abs(resid).max() < 1e-4, ("depth_target: not affine in 1/d (residual "
                                        f"{np.abs(resid).max():.3g}): normalise inverse depth, not depth")


def test_invalid_pixels_are_left_out():
    """0 / NaN / inf are invalid: out of the percentiles and of each cell's mean; an all-invalid cell is 1."""
    d = _depth()
    bad = d.copy()
    bad[0:4, 0:4] = 0.0  # one whole 4x4 cell of the 8x8 output
    bad[20, 5], bad[21, 6], bad[30, 30] = np.nan, np.inf, 0.0
    t, want = D.depth_target(bad, 8)[0].double().numpy(), _oracle(bad, 8)
    assert abs(t[0, 0] - 1.0) < 1e-6, f"depth_target: a cell without valid depth must be 1 (far), got {t[0, 0]:.3f}"
    assert np.isfinite(t).all() and np.abs(t - want).max() < 1e-5, (
        f"depth_target with invalid pixels: max error {np.nanmax(np.abs(t - want)):.3g}; leave them out of the "
        "percentiles and average each cell over its valid pixels only")
