"""depth_head.py: the rectified-flow convention (analytic), flow overfit + sampler, CFG and its drop, regress
keeps the sign, rgb, masking."""
import pytest
import torch

import depth_head as DH
from depth_head import DepthHeadConfig, GenerativeHead

MICRO = dict(llm_dim=24, cond_dim=32, width=32, grid=4, out_size=16)


def _batch(B=4, C=1, S=16, seed=0):
    """Distinct smooth targets (ramps in different directions) and distinct random conditions."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, S), torch.linspace(0, 1, S), indexing="ij")
    maps = [xx, yy, 1 - xx, (xx + yy) / 2, 1 - yy, (1 - xx + yy) / 2]
    target = torch.stack([maps[i % len(maps)] for i in range(B)])[:, None].repeat(1, C, 1, 1)
    return torch.randn(B, 16, 24, generator=g), target


def _train(head, h, target, steps, lr=3e-3, valid=None):
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = head.loss(h, target, valid)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_flow_overfits_and_sampler_reproduces_target():
    torch.manual_seed(0)
    head = GenerativeHead(DepthHeadConfig(**MICRO, cfg_drop=0.1))
    h, target = _batch()
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    err0 = (head.sample(h, steps=10, cfg_scale=1.0, generator=gen()) - target).abs().mean()
    losses = _train(head, h, target, 250)
    assert sum(losses[-20:]) / 20 < 0.3 * sum(losses[:20]) / 20
    err = (head.sample(h, steps=10, cfg_scale=1.0, generator=gen()) - target).abs().mean()
    assert err < 0.3 * err0 and err < 0.08, (err0, err)  # measured: 0.375 -> 0.045


def test_flow_convention_analytic():
    """x_t = (1-t) x0 + t eps, velocity eps - x0; for one data point x0 the exact velocity field is
    (x - x0) / t, and Euler from t = 1 lands exactly on x0 whatever the step count (each step scales
    x - x0 by t_next / t). Integrating the other way (0 -> 1) or flipping the target would not."""
    g = torch.Generator().manual_seed(0)
    x0, eps, t = torch.randn(3, 2, 4, generator=g), torch.randn(3, 2, 4, generator=g), torch.tensor([0.0, 0.3, 1.0])
    xt, v = DH.flow_pair(x0, eps, t)
    assert torch.allclose(xt[0], x0[0]) and torch.allclose(xt[2], eps[2])
    assert torch.allclose(xt[1], 0.7 * x0[1] + 0.3 * eps[1]) and torch.allclose(v, eps - x0)
    for steps in (1, 3, 10):
        out = DH.euler_sample(lambda x, tt: (x - x0) / tt.view(-1, 1, 1), eps, steps)
        assert torch.allclose(out, x0, atol=1e-5), steps


def test_cfg_guidance_and_the_training_drop():
    torch.manual_seed(0)
    head = GenerativeHead(DepthHeadConfig(**MICRO)).eval()
    for p in head.generator.parameters():  # random, non-identity weights so the condition matters
        torch.nn.init.normal_(p, std=0.1)
    h = _batch()[0]
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    cond = head.connector(h)
    noise = torch.randn(4, 1, 16, 16, generator=gen())
    with torch.no_grad():  # an independent path: the generator with an explicit zero condition, integrated by hand
        unguided = DH.euler_sample(lambda x, t: head.generator(x, t, torch.zeros_like(cond)), noise, 4)
    # cfg_scale 0 = the unconditional velocity only = sampling with a zero condition
    assert torch.allclose(head.sample(h, steps=4, cfg_scale=0.0, generator=gen()), ((unguided + 1) / 2).clamp(0, 1), atol=1e-5)
    assert not torch.allclose(head.sample(h, steps=4, cfg_scale=1.0, generator=gen()),
                              head.sample(h, steps=4, cfg_scale=0.0, generator=gen()), atol=1e-3)
    # training: cfg_drop=1 zeroes every condition (no gradient w.r.t. the hidden states); eval mode never drops
    head.cfg.cfg_drop = 1.0
    h, target = _batch()
    for mode, dropped in ((True, True), (False, False)):
        head.train(mode)
        hh = h.clone().requires_grad_(True)
        head.loss(hh, target).backward()
        assert (hh.grad.abs().max() == 0) == dropped, mode


def test_drop_rate_and_null_condition_match_the_sampler():
    """~10% of training samples lose their condition, and a dropped sample's loss is the loss with the
    sampler's null condition (zeros), computed by hand with the same per-sample noise."""
    torch.manual_seed(0)
    head = GenerativeHead(DepthHeadConfig(**MICRO, cfg_drop=0.1)).train()
    for p in head.generator.parameters():
        torch.nn.init.normal_(p, std=0.1)
    B = 400
    h = torch.randn(B, 16, 24).requires_grad_(True)
    target = torch.rand(B, 1, 16, 16)
    seeds = [(p * 0x85EBCA6B) % 2 ** 32 for p in range(B)]
    head.loss(h, target, seeds=seeds).backward()
    dropped = h.grad.flatten(1).abs().amax(1) == 0  # (B,) no gradient reaches a dropped sample's condition
    assert 16 <= dropped.sum() <= 64, dropped.sum()  # Binomial(400, 0.1): mean 40, sd 6
    i = int(dropped.nonzero()[0])
    x0 = target[i:i + 1] * 2 - 1
    t, eps, _ = DH.draw_noise(x0, seeds[i:i + 1])
    xt = (1 - t) * x0 + t * eps
    null = torch.zeros(1, 16, MICRO["cond_dim"])
    want = (head.generator(xt, t, null) - (eps - x0)).pow(2).mean()
    got = head.loss(h[i:i + 1], target[i:i + 1], seeds=seeds[i:i + 1])
    assert torch.allclose(got, want, atol=1e-6)


def test_regress_learns_with_the_right_sign():
    """The regression ablation must learn depth, not inverted depth: after training every sample's output
    correlates positively with its own target (a scale-invariant loss let 3 of 4 toy samples reach -0.999)."""
    torch.manual_seed(0)
    head = GenerativeHead(DepthHeadConfig(**MICRO, objective="regress"))
    h, target = _batch(B=6)
    losses = _train(head, h, target, 150)
    assert losses[-1] < 0.1 * losses[0]
    pred = head.sample(h)
    for p, y in zip(pred.flatten(1), target.flatten(1)):
        assert torch.corrcoef(torch.stack([p, y]))[0, 1] > 0.9
    assert (pred - target).abs().mean() < 0.1  # calibrated: sampled output is the target itself, no alignment


def test_rgb_target_has_three_channels():
    torch.manual_seed(0)
    head = GenerativeHead(DepthHeadConfig(**MICRO, modality="rgb"))
    h, target = _batch(C=3)
    assert head.loss(h, target).isfinite()
    assert head.sample(h, steps=2).shape == (4, 3, 16, 16)
    with pytest.raises(ValueError, match="modality"):
        head.loss(h, target[:, :1])


def test_invalid_samples_contribute_nothing():
    torch.manual_seed(0)
    head = GenerativeHead(DepthHeadConfig(**MICRO, cfg_drop=0.0))  # no drop: every valid sample sends a gradient
    h, target = _batch()
    h.requires_grad_(True)
    valid = torch.tensor([True, False, True, False])
    bad = target.clone()
    bad[1] = float("nan")  # garbage where no depth exists
    torch.manual_seed(1)
    a = head.loss(h, bad, valid)
    a.backward()
    assert a.isfinite() and h.grad[1].abs().max() == 0 and h.grad[3].abs().max() == 0 and h.grad[0].abs().max() > 0
    torch.manual_seed(1)
    bad[3] = 0.5  # a different target for an invalid sample changes nothing
    assert torch.allclose(head.loss(h, bad, valid), a)
    none = head.loss(h, target, torch.zeros(4, dtype=torch.bool))
    assert none.item() == 0.0 and none.requires_grad
