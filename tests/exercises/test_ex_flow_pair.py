"""Exercise flow_pair (depth_head.flow_pair): the rectified-flow interpolant and its velocity target.
Convention (SANA / SD3): t = 0 is data, t = 1 is noise."""
import torch

import depth_head as DH


def _pair(shape=(4, 1, 6, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def test_shapes_and_finite():
    for shape in ((4, 1, 6, 6), (4, 8, 7)):  # depth maps and action chunks
        x0, eps = _pair(shape)
        xt, v = DH.flow_pair(x0, eps, torch.rand(4))
        assert xt.shape == x0.shape and v.shape == x0.shape, f"flow_pair: {tuple(xt.shape)}, {tuple(v.shape)} for {shape}"
        assert torch.isfinite(xt).all() and torch.isfinite(v).all()


def test_endpoints_data_at_0_noise_at_1():
    x0, eps = _pair()
    xt, _ = DH.flow_pair(x0, eps, torch.tensor([0.0, 1.0, 0.0, 1.0]))
    if torch.allclose(xt[0], eps[0]) and torch.allclose(xt[1], x0[1]):
        raise AssertionError("flow_pair: time runs the other way here: t = 0 must be the DATA x0 and t = 1 the "
                             "noise (x_t = (1 - t) x0 + t eps; the paper's VLA writes t -> 1 - t)")
    assert torch.allclose(xt[0], x0[0]) and torch.allclose(xt[1], eps[1]), "flow_pair: x_0 = x0 and x_1 = noise"


def test_target_is_the_time_derivative():
    """The velocity target is d x_t / dt along the path: check it by a finite difference."""
    x0, eps = _pair()
    t, h = torch.tensor([0.1, 0.4, 0.6, 0.9]), 1e-3
    (a, v), (b, _) = DH.flow_pair(x0, eps, t), DH.flow_pair(x0, eps, t + h)
    fd = (b - a) / h
    if torch.allclose(v, -fd, atol=1e-2):
        raise AssertionError("flow_pair: the target is flipped: regress d x_t/dt = noise - x0, not x0 - noise")
    assert torch.allclose(v, fd, atol=1e-2), f"flow_pair: velocity differs from d x_t/dt by {(v - fd).abs().max():.3g}"


def test_each_sample_has_its_own_time():
    x0, eps = _pair()
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    xt, _ = DH.flow_pair(x0, eps, t)
    for i in range(4):
        assert torch.allclose(xt[i], (1 - t[i]) * x0[i] + t[i] * eps[i], atol=1e-6), f"flow_pair: sample {i} uses t[{i}]"
