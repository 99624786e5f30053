"""GEM-mini generative head: connector + a small conditional conv generator, trained by rectified flow.

The LLM's last-layer hidden states at the image tokens (GEM.forward -> out["image_hidden"], (B, N, D))
pass through the `Connector` and condition the `Generator`, a small U-Net that generates the image's
normalised inverse depth (or its RGB, the paper's ablation) at `out_size` pixels. `GenerativeHead` is the
two together: "head" in this project always means connector + generator. The head is a training signal
for the VLM; at inference it only visualises what the features know (eval.py's probe).

Use:
    head = GenerativeHead(DepthHeadConfig(llm_dim=cfg.dim, grid=cfg.grid, out_size=32))
    loss = head.loss(out["image_hidden"], batch["target"], batch["target_valid"])  # L_flow (train_pretrain.gem_loss)
    depth = head.sample(out["image_hidden"], steps=30, cfg_scale=5.0)              # (B, 1, 32, 32) in [0, 1]

Rectified flow, one convention for both generative heads (this one and train_vla's action expert):
t = 0 is data and t = 1 is noise (SANA / SD3): x_t = (1 - t) x0 + t eps, the network regresses the
velocity eps - x0, and sampling integrates from t = 1 down to t = 0 (flow_pair, euler_sample). Every
checkpoint with a head or an action expert records FLOW_CONVENTION in its config.json.

Paper -> code map (PAPER.md "Architecture")
  connector Linear -> GELU(tanh) -> Linear -> RMSNorm        Connector
  generator (SANA DiT in DC-AE latents; ours: pixels)        Generator (conv U-Net, grid -> out_size)
  condition laid back on the image-token grid                Generator.cond_in (added at every resolution)
  flow time conditioning (AdaLN; ours AdaGN/FiLM)            ResBlock.film, Generator.time_mlp
  x_s = (1 - s) z + s eps, target eps - z, uniform s, MSE    flow_pair, GenerativeHead.loss
  condition zeroed for 10% of samples (CFG)                  DepthHeadConfig.cfg_drop, null_condition
  30 Euler steps, CFG 5.0                                    euler_sample, GenerativeHead.sample
  ablations: RGB reconstruction; "is generative needed?"     modality="rgb"; objective="regress" (plain MSE)
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import RMSNorm

# ----------------------------------------------------------------------------------------------------
# Rectified flow (shared with train_vla.py's action expert)

FLOW_CONVENTION = "x_t=(1-t)*x0+t*eps; v=eps-x0; sample t=1->0"


def flow_pair(x0, noise, t):
    """-> (x_t, velocity target) for data x0 (B, ...), noise like x0 and flow time t (B,) in [0, 1]."""
    # >>> exercise: flow_pair
    t = t.view(-1, *[1] * (x0.dim() - 1))  # (B, 1, ...) broadcasts over each sample
    return (1 - t) * x0 + t * noise, noise - x0
    # <<< exercise


def euler_sample(velocity, noise, steps: int):
    """Integrate dx/dt = velocity(x, t) from x(1) = noise down to x(0) (data) in `steps` Euler steps."""
    # >>> exercise: euler_sample
    x = noise
    for i in range(steps):
        t = torch.full((x.shape[0],), 1.0 - i / steps, device=x.device)
        x = x - velocity(x, t) / steps  # a step of -1/steps in t
    return x
    # <<< exercise


def timestep_embedding(t, dim: int):
    """Sinusoidal embedding of the flow time t in [0, 1] (B,) -> (B, dim); t scaled by 1000 as in DiT."""
    freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, device=t.device, dtype=torch.float32) / (dim // 2))
    a = 1000.0 * t[:, None].float() * freqs  # (B, dim/2)
    return torch.cat([a.cos(), a.sin()], dim=-1)


def null_condition(cond):
    """The 'no condition' of classifier-free guidance: zeros, in training (the drop) and sampling alike."""
    return torch.zeros_like(cond)


def draw_noise(x0, seeds=None):
    """Per-sample flow time t ~ U(0, 1) (B,), noise eps like x0, and u ~ U(0, 1) (B,) for the CFG drop.

    seeds (B,) ints, e.g. each sample's global position in the training stream: a sample's draws then
    depend on its seed alone, so one process and a batch split over DDP processes see the same numbers.
    Or the draws (t, eps, u) already made from such seeds (by the training loader's worker processes, off
    the training thread): moved to x0's device. Without seeds: the global torch RNG."""
    B = x0.shape[0]
    if isinstance(seeds, tuple):
        t, noise, u = seeds
        return t.to(x0.device), noise.to(x0.device, x0.dtype), u.to(x0.device)
    if seeds is None:
        return torch.rand(B, device=x0.device), torch.randn_like(x0), torch.rand(B, device=x0.device)
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    tu = torch.stack([torch.rand(2, generator=g) for g in gens])  # (B, 2)
    noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens])
    tu = tu.to(x0.device)
    return tu[:, 0], noise.to(x0.device, x0.dtype), tu[:, 1]


@dataclasses.dataclass
class DepthHeadConfig:
    llm_dim: int = 192  # width of the LLM hidden states (GEMConfig.dim)
    cond_dim: int = 128  # connector output width
    width: int = 32  # conv channels at every resolution (multiple of 8); cost ~ width^2: 64 is 3x slower
    grid: int = 4  # image tokens per side (GEMConfig.grid)
    out_size: int = 32  # target H = W; out_size / grid must be a power of two
    modality: str = "depth"  # what the head generates: "depth" (1 channel) | "rgb" (3, the reconstruction ablation)
    objective: str = "flow"  # "flow" (rectified flow) | "regress" (one pass, plain MSE: is "generative" needed?)
    cfg_drop: float = 0.1  # fraction of training samples whose condition is zeroed (for CFG)
    blocks: int = 1  # residual blocks per resolution and path

    @property
    def channels(self) -> int:
        return 1 if self.modality == "depth" else 3


class Connector(nn.Module):
    """LLM width -> condition width, as the paper's: Linear -> GELU(tanh) -> Linear -> RMSNorm."""

    def __init__(self, llm_dim: int, cond_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(llm_dim, cond_dim)
        self.fc2 = nn.Linear(cond_dim, cond_dim)
        self.norm = RMSNorm(cond_dim)

    def forward(self, h):  # (B, N, llm_dim) -> (B, N, cond_dim)
        # >>> exercise: connector
        return self.norm(self.fc2(F.gelu(self.fc1(h), approximate="tanh")))
        # <<< exercise


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv -> AdaGN (scale/shift from the time + pooled condition) -> SiLU -> conv."""

    def __init__(self, ch: int, emb: int):
        super().__init__()
        self.n1, self.n2 = nn.GroupNorm(8, ch), nn.GroupNorm(8, ch)
        self.c1, self.c2 = nn.Conv2d(ch, ch, 3, padding=1), nn.Conv2d(ch, ch, 3, padding=1)
        self.film = nn.Linear(emb, 2 * ch)
        nn.init.zeros_(self.c2.weight)  # each block starts as the identity (DiT-style clean start)
        nn.init.zeros_(self.c2.bias)

    def forward(self, x, emb):  # x (B, ch, s, s), emb (B, E)
        h = self.c1(F.silu(self.n1(x)))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)  # (B, ch, 1, 1) each
        return x + self.c2(F.silu(self.n2(h) * (1 + scale) + shift))


class Generator(nn.Module):
    """A small U-Net from out_size down to the token grid and back, conditioned on the connector output.

    The condition (B, N, cond) is laid back onto the token grid (B, cond, g, g) and added, through a 1x1
    conv, at every resolution of the decoder (upsampled), so each pixel sees the tokens above it; its mean
    over tokens joins the time embedding that drives every block's AdaGN.
    """

    def __init__(self, c: DepthHeadConfig):
        super().__init__()
        self.c = c
        ratio = c.out_size // c.grid
        if c.out_size % c.grid or ratio & (ratio - 1):
            raise ValueError(f"DepthHeadConfig: out_size / grid = {c.out_size}/{c.grid} must be a power of two")
        if c.modality not in ("depth", "rgb") or c.objective not in ("flow", "regress"):
            raise ValueError(f"DepthHeadConfig: modality {c.modality!r} / objective {c.objective!r} unknown")
        self.levels = int(math.log2(ratio))  # stride-2 steps between out_size and grid
        W, E = c.width, 2 * c.width
        self.time_mlp = nn.Sequential(nn.Linear(W, E), nn.SiLU(), nn.Linear(E, E))
        self.cond_pool = nn.Linear(c.cond_dim, E)
        self.stem = nn.Conv2d(c.channels, W, 3, padding=1)
        self.down = nn.ModuleList(nn.ModuleList([*(ResBlock(W, E) for _ in range(c.blocks)),
                                                 nn.Conv2d(W, W, 3, stride=2, padding=1)])
                                  for _ in range(self.levels))
        self.mid = nn.ModuleList(ResBlock(W, E) for _ in range(2))
        self.up = nn.ModuleList(nn.ModuleList([nn.Conv2d(2 * W, W, 1), *(ResBlock(W, E) for _ in range(c.blocks))])
                                for _ in range(self.levels))
        self.cond_in = nn.ModuleList(nn.Conv2d(c.cond_dim, W, 1) for _ in range(self.levels + 1))
        self.out = nn.Sequential(nn.GroupNorm(8, W), nn.SiLU(), nn.Conv2d(W, c.channels, 3, padding=1))

    def forward(self, x, t, cond):
        """x (B, C, S, S) noisy sample, t (B,) flow time, cond (B, N, cond_dim) -> velocity (B, C, S, S)."""
        B, N, D = cond.shape
        g = self.c.grid
        cmap = cond.transpose(1, 2).reshape(B, D, g, g)  # (B, cond, g, g): token j sits at (j // g, j % g)
        emb = self.time_mlp(timestep_embedding(t, self.c.width)) + self.cond_pool(cond.mean(1))  # (B, E)
        h, skips = self.stem(x), []
        for *blocks, pool in self.down:
            for blk in blocks:
                h = blk(h, emb)
            skips.append(h)
            h = pool(h)  # (B, W, s/2, s/2)
        h = h + self.cond_in[0](cmap)  # at the token grid
        for blk in self.mid:
            h = blk(h, emb)
        for i, (merge, *blocks) in enumerate(self.up):
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            h = merge(torch.cat([h, skips.pop()], dim=1))  # U-Net skip: (B, 2W, s, s) -> (B, W, s, s)
            h = h + self.cond_in[i + 1](F.interpolate(cmap, size=h.shape[-2:], mode="nearest"))
            for blk in blocks:
                h = blk(h, emb)
        return self.out(h)


class GenerativeHead(nn.Module):
    """Connector + Generator: the GEM auxiliary objective on the VLM's image-token hidden states."""

    def __init__(self, c: DepthHeadConfig):
        super().__init__()
        self.cfg = c
        self.connector = Connector(c.llm_dim, c.cond_dim)
        self.generator = Generator(c)

    def loss(self, image_hidden, target, valid=None, seeds=None):
        """L_flow: image_hidden (B, N, D), target (B, C, S, S) in [0, 1], valid (B,) bool or a per-pixel
        mask (B, 1, S, S) (pixels without depth) -> scalar.

        Each sample's loss is the mean over its valid pixels; the result the mean over samples with any; a batch without any valid sample gives 0.0 that still has a graph
        (so DDP / the optimizer see the same parameters every step). The CFG drop applies only in
        training mode. seeds: see draw_noise.
        """
        B, C, S = target.shape[0], self.cfg.channels, self.cfg.out_size
        if tuple(target.shape[1:]) != (C, S, S):
            raise ValueError(f"depth head target: shape {tuple(target.shape)}, expected (B, {C}, {S}, {S}) "
                             f"for modality={self.cfg.modality!r}, out_size={S}")
        # >>> exercise: head_loss
        m = torch.ones(B, dtype=torch.bool, device=target.device) if valid is None else valid.bool()
        m = (m[:, None, None, None] if m.dim() == 1 else m).expand(B, C, S, S)  # (B, C, S, S) pixels trained
        cond = self.connector(image_hidden)  # (B, N, cond)
        # invalid samples may carry garbage targets (NaN): zero them so 0 * NaN never reaches a gradient
        x0 = torch.where(m, target.nan_to_num(0.0), 0.0).to(cond.dtype) * 2 - 1
        if self.cfg.objective == "regress":  # one pass from a blank input, straight onto the target
            pred = self.generator(torch.zeros_like(x0), torch.zeros(B, device=x0.device), cond)
            err = (pred - x0).float().pow(2)  # (B, C, S, S)
        else:
            t, noise, u = draw_noise(x0, seeds)
            if self.training:
                drop = u < self.cfg.cfg_drop  # (B,)
                cond = torch.where(drop[:, None, None], null_condition(cond), cond)
            xt, v = flow_pair(x0, noise, t)
            err = (self.generator(xt, t, cond) - v).float().pow(2)  # (B, C, S, S)
        n = m.flatten(1).sum(1)  # (B,) valid pixels per sample
        per = (err * m).flatten(1).sum(1) / n.clamp(min=1)  # (B,) mean over the valid pixels
        return per.sum() / (n > 0).sum().clamp(min=1)
        # <<< exercise

    @torch.no_grad()
    def sample(self, image_hidden, steps: int = 30, cfg_scale: float = 5.0, generator=None):
        """-> generated target (B, C, S, S) in [0, 1]. Classifier-free guidance:
        v = v(null) + cfg_scale * (v(cond) - v(null)); cfg_scale 1 is the conditional flow alone."""
        cond = self.connector(image_hidden)
        B, C, S = cond.shape[0], self.cfg.channels, self.cfg.out_size
        if self.cfg.objective == "regress":  # direct prediction: one pass, no noise, no guidance
            x = self.generator(torch.zeros(B, C, S, S, device=cond.device, dtype=cond.dtype),
                               torch.zeros(B, device=cond.device), cond)
            return ((x.float() + 1) / 2).clamp(0, 1)
        both = torch.cat([cond, null_condition(cond)])  # conditional and unconditional in one batch

        def velocity(x, t):  # the guided velocity at (x, t), one generator call for both conditions
            # >>> exercise: cfg
            if cfg_scale == 1.0:
                return self.generator(x, t, cond)
            vc, vu = self.generator(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
            return vu + cfg_scale * (vc - vu)
            # <<< exercise
        noise = torch.randn(B, C, S, S, device=cond.device, generator=generator).to(cond.dtype)
        x = euler_sample(velocity, noise, steps)
        return ((x.float() + 1) / 2).clamp(0, 1)
