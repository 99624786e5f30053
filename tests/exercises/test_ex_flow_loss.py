"""Exercise flow_loss (train_vla.flow_matching_loss): rectified flow on the action chunk with logit-normal
time, repeats and the padding mask. Graded with mock experts that know the true velocity of the project's
convention (x_t = (1 - t) a + t eps, target eps - a): from x_t and t alone it is (x_t - a) / t."""
import math

import pytest
import torch

import train_vla as V
from oracles import flow_pair


@pytest.fixture(autouse=True)
def _reference_flow_pair(monkeypatch):
    monkeypatch.setattr(V, "flow_pair", flow_pair)  # not this exercise's code


def _batch(B=4, H=5, A=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    actions, state = torch.randn(B, H, A, generator=g), torch.randn(B, 2, generator=g)
    ctx = [(torch.randn(B, 2, 3, generator=g), torch.randn(B, 2, 3, generator=g))]
    mask = torch.ones(B, H, dtype=torch.bool)
    mask[1, 3:] = False
    mask[3, 1:] = False
    return actions, state, ctx, mask


def _true_expert(actions, repeats=1, extra=None, log=None):
    a = actions.repeat_interleave(repeats, 0)

    def expert(x_t, t, state, ctx):
        if log is not None:
            log.append((t.clone(), state.clone(), ctx))
        v = (x_t - a) / t.clamp(min=1e-6).view(-1, 1, 1)
        return v if extra is None else v + extra.repeat_interleave(repeats, 0)
    return expert


def test_shapes_and_finite():
    actions, state, ctx, mask = _batch()
    loss = V.flow_matching_loss(lambda x, t, s, c: torch.zeros_like(x), ctx, actions, state, mask)
    assert loss.dim() == 0 and torch.isfinite(loss), f"flow_matching_loss: a finite scalar, got {loss}"


def test_zero_at_the_true_velocity():
    actions, state, ctx, mask = _batch()
    g = torch.Generator().manual_seed(3)
    loss = V.flow_matching_loss(_true_expert(actions), ctx, actions, state, mask, generator=g)
    assert loss < 1e-6, (f"flow_matching_loss = {loss:.3g} for an expert that predicts the true velocity: use the "
                         "project's convention (depth_head.flow_pair): x_t = (1 - t) a + t eps, target eps - a")


def test_constant_error_gives_its_square():
    actions, state, ctx, mask = _batch()
    loss = V.flow_matching_loss(_true_expert(actions, extra=torch.full_like(actions, 0.5)), ctx, actions, state, mask)
    assert abs(loss.item() - 0.25) < 1e-4, f"flow_matching_loss = {loss:.4f}, want 0.25: the mean squared error"


def test_padded_steps_are_left_out():
    actions, state, ctx, mask = _batch()
    extra = torch.where(mask[..., None], 0.0, 100.0).expand_as(actions).contiguous()
    loss = V.flow_matching_loss(_true_expert(actions, extra=extra), ctx, actions, state, mask)
    assert loss < 1e-4, f"flow_matching_loss = {loss:.3g}: steps past the episode end (action_mask False) must not count"


def test_mean_over_valid_steps():
    """Error 1 on every valid step of samples 0 and 2 (5 + 5 steps), 2 on samples 1 and 3 (3 + 1 steps):
    the mean over the 14 valid steps is (10 * 1 + 4 * 4) / 14."""
    actions, state, ctx, mask = _batch()
    extra = torch.tensor([1.0, 2.0, 1.0, 2.0]).view(4, 1, 1).expand_as(actions).contiguous()
    loss = V.flow_matching_loss(_true_expert(actions, extra=extra), ctx, actions, state, mask)
    assert abs(loss.item() - 26 / 14) < 1e-4, f"flow_matching_loss = {loss:.4f}, want {26 / 14:.4f} (mean over valid steps)"


def test_time_is_logit_normal():
    actions, state, ctx, mask = _batch(B=64)
    mask[:] = True
    log = []
    V.flow_matching_loss(_true_expert(actions, repeats=4, log=log), ctx, actions, state, mask, repeats=4,
                         t_mu=1.5, t_sigma=0.5, generator=torch.Generator().manual_seed(0))
    t = log[0][0]
    z = torch.log(t / (1 - t))
    assert t.shape == (256,) and ((t > 0) & (t < 1)).all()
    assert abs(z.mean() - 1.5) < 0.15 and abs(z.std() - 0.5) < 0.1, (
        f"flow_matching_loss: logit(t) has mean {z.mean():.2f}, std {z.std():.2f}; want t = sigmoid(t_mu + t_sigma * N(0, 1))")


def test_repeats_keep_each_samples_copies_adjacent():
    actions, state, ctx, mask = _batch()
    log = []
    loss = V.flow_matching_loss(_true_expert(actions, repeats=3, log=log), ctx, actions, state, mask, repeats=3)
    _, st, cx = log[0]
    assert torch.equal(st, state.repeat_interleave(3, 0)), "flow_matching_loss: repeats -> state.repeat_interleave(3, 0)"
    assert torch.equal(cx[0][0], ctx[0][0].repeat_interleave(3, 0)), "flow_matching_loss: repeat the context like the state"
    assert loss < 1e-6
