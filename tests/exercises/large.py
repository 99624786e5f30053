"""The large tier: train something and hit a number. One procedure per exercise, used by the grading test
(on the grading tree) and by `python teach.py calibrate` (on the reference, over several seeds, to set the
threshold = mean - k * std of the score, higher is better: teach/thresholds.json)."""
import time

import numpy as np
import torch

from oracles import block_mean

SUITES = ("spatial", "object", "goal", "long")


def scenes(n: int, first_seed: int, size: int = 64):
    """n simulator scenes (RGB, depth) from the four suites' training seeds (fixed LIBERO-style camera)."""
    import sim_env
    out = []
    for k in range(n):
        env = sim_env.TabletopEnv(SUITES[k % 4], (k // 4) % 10, size)
        obs, _ = env.reset(seed=first_seed + k)
        out.append((obs["rgb"], obs["depth"]))
    return out


def condition(rgb: np.ndarray, dim: int = 24) -> torch.Tensor:
    """A frozen stand-in for the VLM's image tokens: each 16x16 patch's mean and std colour through a fixed
    random projection plus a fixed position code -> (16, dim). Deterministic: the same for every seed."""
    g = torch.Generator().manual_seed(1234)
    W, pos = torch.randn(6, dim, generator=g), torch.randn(16, dim, generator=g) * 0.5
    p = torch.from_numpy(rgb).float().div(255).view(4, 16, 4, 16, 3).permute(0, 2, 1, 3, 4).reshape(16, 256, 3)
    return torch.tanh(torch.cat([p.mean(1), p.std(1)], 1) @ W + pos)


def depth_target(depth: np.ndarray, size: int) -> torch.Tensor:
    """The GEM target of an all-valid depth map, written here (not data.depth_target, another exercise):
    1 - inverse depth scaled by its 2% / 98% quantiles, clipped; block means down to size."""
    inv = 1.0 / depth.astype(np.float64)
    lo, hi = np.quantile(inv, [0.02, 0.98])
    return torch.from_numpy(block_mean(1.0 - np.clip((inv - lo) / (hi - lo), 0.0, 1.0), size)).float()[None]


def head_loss(seed: int, steps: int = 150, n_train: int = 48, n_test: int = 16) -> dict:
    """Train a micro depth head (connector + generator) with GenerativeHead.loss for `steps` Adam steps on
    n_train scenes; -> its score on n_test other scenes (each the mean of 4 samples, 10 Euler steps, CFG 1): the
    residual correlation corr(sample - m, target - m) per scene, averaged, with m the mean training target. The
    camera is fixed, so m alone is close (a small mean absolute error); what the head adds is the scene-specific
    part, and a head that collapses to m scores 0. Also the mean absolute errors of the samples and of m."""
    import depth_head as DH
    t0 = time.time()
    torch.manual_seed(seed)
    train, test = scenes(n_train, 0), scenes(n_test, 5000)
    xs = lambda sc: torch.stack([condition(r) for r, _ in sc])  # noqa: E731
    ys = lambda sc: torch.stack([depth_target(d, 16) for _, d in sc])  # noqa: E731
    htr, ytr, hte, yte = xs(train), ys(train), xs(test), ys(test)
    head = DH.GenerativeHead(DH.DepthHeadConfig(llm_dim=24, cond_dim=32, width=16, grid=4, out_size=16))
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    rng = np.random.default_rng(seed)
    for step in range(steps):
        idx = rng.choice(n_train, 16, replace=False)
        loss = head.loss(htr[idx], ytr[idx], seeds=[seed * 100_000 + step * 16 + i for i in range(16)])
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    s = head.sample(hte.repeat(4, 1, 1), steps=10, cfg_scale=1.0, generator=torch.Generator().manual_seed(seed))
    s = s.view(4, n_test, *s.shape[1:]).mean(0)  # the mean of 4 samples per scene: the conditional mean
    m = ytr.mean(0)  # (1, S, S) the do-nothing baseline
    a, b = (s - m).flatten(1), (yte - m).flatten(1)  # (n_test, S*S) residuals
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    corr = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp(min=1e-8)  # (n_test,)
    return dict(score=float(corr.mean()), error=float((s - yte).abs().mean()), baseline=float((m - yte).abs().mean()),
                last_loss=float(loss.detach()), seconds=round(time.time() - t0, 1))
