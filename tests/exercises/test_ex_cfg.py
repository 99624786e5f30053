"""Exercise cfg (the guided velocity inside depth_head.GenerativeHead.sample): classifier-free guidance
v = v(null) + s * (v(cond) - v(null)). The test catches the velocity closure that sample() hands to
euler_sample and compares it with two separate generator calls; the connector is replaced by a plain
Linear, so only this exercise's code is graded."""
import pytest
import torch

import depth_head as DH
from oracles import euler


@pytest.fixture
def head():
    torch.manual_seed(0)
    h = DH.GenerativeHead(DH.DepthHeadConfig(llm_dim=24, cond_dim=32, width=16, grid=4, out_size=8)).eval()
    h.connector = torch.nn.Linear(24, 32)  # not this exercise's code
    return h


def _velocity(head, scale, monkeypatch):
    got = {}

    def capture(velocity, noise, steps):
        got["v"] = velocity
        return euler(velocity, noise, steps)
    monkeypatch.setattr(DH, "euler_sample", capture)
    hid = torch.randn(2, 16, 24, generator=torch.Generator().manual_seed(1))
    out = head.sample(hid, steps=2, cfg_scale=scale)
    return got["v"], head.connector(hid).detach(), out


def _xt(seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 1, 8, 8, generator=g), torch.rand(2, generator=g)


def _two_passes(head, cond, x, t, scale):
    with torch.no_grad():
        vc = head.generator(x, t, cond)
        vu = head.generator(x, t, torch.zeros_like(cond))
    return vc, vu, vu + scale * (vc - vu)


def test_shapes_and_finite(head, monkeypatch):
    v, _, out = _velocity(head, 5.0, monkeypatch)
    x, t = _xt()
    with torch.no_grad():
        y = v(x, t)
    assert y.shape == x.shape and torch.isfinite(y).all(), f"guided velocity: {tuple(y.shape)}, want {tuple(x.shape)}"
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()


def test_matches_two_generator_passes(head, monkeypatch):
    v, cond, _ = _velocity(head, 3.0, monkeypatch)
    x, t = _xt()
    vc, vu, want = _two_passes(head, cond, x, t, 3.0)
    with torch.no_grad():
        y = v(x, t)
    if torch.allclose(y, vc + 3.0 * (vu - vc), atol=1e-4):
        raise AssertionError("cfg: conditional and unconditional are swapped: `both` is [cond, null], so the first "
                             "half of the batched output is v(cond)")
    assert torch.allclose(y, want, atol=1e-4), (f"cfg (scale 3): max error {(y - want).abs().max():.3g} against "
                                                "v(null) + 3 * (v(cond) - v(null))")


def test_scale_one_is_the_conditional_flow(head, monkeypatch):
    v, cond, _ = _velocity(head, 1.0, monkeypatch)
    x, t = _xt()
    vc, _, _ = _two_passes(head, cond, x, t, 1.0)
    with torch.no_grad():
        assert torch.allclose(v(x, t), vc, atol=1e-4), "cfg: at scale 1 the guided velocity is v(cond) alone"


def test_scale_zero_is_the_unconditional_flow(head, monkeypatch):
    v, cond, _ = _velocity(head, 0.0, monkeypatch)
    x, t = _xt()
    _, vu, _ = _two_passes(head, cond, x, t, 0.0)
    with torch.no_grad():
        y = v(x, t)
    assert torch.allclose(y, vu, atol=1e-4), ("cfg: at scale 0 the guided velocity is v(null) (condition zeroed); "
                                              f"off by {(y - vu).abs().max():.3g}: guide from v(null), not from v(cond)")
