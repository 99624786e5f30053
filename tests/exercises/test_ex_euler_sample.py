"""Exercise euler_sample (depth_head.euler_sample): integrate the flow from noise (t = 1) to data (t = 0)."""
import torch

import depth_head as DH


def _noise(seed=0):
    return torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(seed))


def test_shapes_and_finite():
    eps = _noise()
    x = DH.euler_sample(lambda x, t: torch.zeros_like(x), eps, 4)
    assert x.shape == eps.shape and torch.isfinite(x).all()


def test_straight_path_lands_on_the_data():
    """With the exact velocity of a straight path (eps - x0, constant) any number of steps reaches x0."""
    eps, x0 = _noise(0), _noise(1)
    for steps in (1, 2, 7):
        out = DH.euler_sample(lambda x, t: eps - x0, eps, steps)
        if torch.allclose(out, 2 * eps - x0, atol=1e-5):
            raise AssertionError("euler_sample: you moved the wrong way: t decreases, so x <- x - v / steps")
        assert torch.allclose(out, x0, atol=1e-5), f"euler_sample ({steps} steps) missed x0 by {(out - x0).abs().max():.3g}"


def test_time_grid_runs_from_one_down():
    seen = []

    def v(x, t):
        assert t.shape == (3,), f"euler_sample: t must be (B,) = (3,), got {tuple(t.shape)}"
        seen.append(round(float(t[0]), 6))
        return torch.zeros_like(x)
    DH.euler_sample(v, _noise(), 4)
    assert seen == [1.0, 0.75, 0.5, 0.25], (f"euler_sample: velocity read at t = {seen}, want [1.0, 0.75, 0.5, 0.25]: "
                                            "start at the noise (t = 1), read v at the start of each step")


def test_time_dependent_field():
    """v(x, t) = t * c: Euler with 5 steps gives x = eps - c * (1 + 0.8 + 0.6 + 0.4 + 0.2) / 5."""
    eps, c = _noise(0), _noise(2)
    out = DH.euler_sample(lambda x, t: t.view(-1, 1, 1, 1) * c, eps, 5)
    assert torch.allclose(out, eps - 0.6 * c, atol=1e-5), f"euler_sample: off by {(out - eps + 0.6 * c).abs().max():.3g}"
