"""GEM-mini generative depth head: connector + a small conditional conv generator trained by flow matching.

The LLM's last-layer hidden states at the image tokens (GEM.forward -> out["image_hidden"], (B, N, D))
pass through the `Connector` and condition `DepthHead`, a small U-Net that generates the image's
normalised inverse depth (or its RGB, the paper's ablation) at `out_size` pixels. The head is a training
signal for the VLM; at inference it only visualises what the features know (eval.py's probe).

Use:
    head = GenerativeHead(DepthHeadConfig(llm_dim=cfg.dim, grid=cfg.grid, out_size=32))
    loss = head.loss(out["image_hidden"], batch["depth_target"], batch["depth_valid"])  # L = L_CE + 0.1 * loss
    depth = head.sample(out["image_hidden"], steps=30, cfg_scale=5.0)                  # (B, 1, 32, 32) in [0, 1]

Paper -> code map (PAPER.md "Architecture")
  connector Linear -> GELU(tanh) -> Linear -> RMSNorm        Connector
  generator (SANA DiT in DC-AE latents; ours: pixels)        DepthHead (conv U-Net, grid -> out_size)
  condition laid back on the image-token grid                DepthHead.cond_in (added at every resolution)
  flow time conditioning (AdaLN; ours AdaGN/FiLM)            ResBlock.film, DepthHead.time_mlp
  x_s = (1 - s) z + s eps, target eps - z, uniform s, MSE    GenerativeHead.loss, objective="flow"
  condition zeroed for 10% of samples (CFG)                  DepthHeadConfig.cfg_drop
  30 Euler steps, CFG 5.0                                    GenerativeHead.sample / DepthHead.sample
  ablations: RGB reconstruction; "is generative needed?"     target="rgb"; objective="regress" (+ ssi_loss)
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import RMSNorm


@dataclasses.dataclass
class DepthHeadConfig:
    llm_dim: int = 192  # width of the LLM hidden states (GEMConfig.dim)
    cond_dim: int = 128  # connector output width
    width: int = 32  # conv channels at every resolution (multiple of 8); cost ~ width^2: 64 is 3x slower
    grid: int = 4  # image tokens per side (GEMConfig.grid)
    out_size: int = 32  # target H = W; out_size / grid must be a power of two
    target: str = "depth"  # "depth" (1 channel) | "rgb" (3 channels, the reconstruction ablation)
    objective: str = "flow"  # "flow" (rectified flow) | "regress" (direct, scale-and-shift-invariant loss)
    cfg_drop: float = 0.1  # fraction of training samples whose condition is zeroed (for CFG)
    blocks: int = 1  # residual blocks per resolution and path

    @property
    def channels(self) -> int:
        return 1 if self.target == "depth" else 3


class Connector(nn.Module):
    """LLM width -> condition width, as the paper's: Linear -> GELU(tanh) -> Linear -> RMSNorm."""

    def __init__(self, llm_dim: int, cond_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(llm_dim, cond_dim)
        self.fc2 = nn.Linear(cond_dim, cond_dim)
        self.norm = RMSNorm(cond_dim)

    def forward(self, h):  # (B, N, llm_dim) -> (B, N, cond_dim)
        return self.norm(self.fc2(F.gelu(self.fc1(h), approximate="tanh")))


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


def timestep_embedding(t, dim: int):
    """Sinusoidal embedding of flow time t in [0, 1] -> (B, dim)."""
    freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    a = 1000.0 * t[:, None].float() * freqs  # (B, dim/2)
    return torch.cat([a.cos(), a.sin()], dim=-1)


class DepthHead(nn.Module):
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
        if c.target not in ("depth", "rgb") or c.objective not in ("flow", "regress"):
            raise ValueError(f"DepthHeadConfig: target {c.target!r} / objective {c.objective!r} unknown")
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

    @torch.no_grad()
    def sample(self, cond, steps: int = 30, cfg_scale: float = 5.0, generator=None):
        """Euler integration of the flow from noise (t = 1) to data (t = 0) -> (B, C, S, S) in [-1, 1].

        Classifier-free guidance: v = v(zeroed cond) + cfg_scale * (v(cond) - v(zeroed cond)).
        """
        B, C, S = cond.shape[0], self.c.channels, self.c.out_size
        if self.c.objective == "regress":  # direct prediction: one pass, no noise, no guidance
            return self(torch.zeros(B, C, S, S, device=cond.device, dtype=cond.dtype),
                        torch.zeros(B, device=cond.device), cond)
        x = torch.randn(B, C, S, S, device=cond.device, generator=generator).to(cond.dtype)
        both = torch.cat([cond, torch.zeros_like(cond)])  # conditional and unconditional in one batch
        for i in range(steps):
            t = torch.full((B,), 1.0 - i / steps, device=cond.device)
            if cfg_scale == 1.0:
                v = self(x, t, cond)
            else:
                vc, vu = self(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
                v = vu + cfg_scale * (vc - vu)
            x = x - v / steps  # dx/dt = noise - x0, integrate t: 1 -> 0
        return x


def ssi_loss(pred, target):
    """Scale-and-shift-invariant MSE (MiDaS): fit s, b per sample by least squares, then MSE(s*pred+b, target).
    pred/target (B, C, S, S) -> per-sample loss (B,)."""
    p, y = pred.flatten(1), target.flatten(1)
    pm, ym = p.mean(1, keepdim=True), y.mean(1, keepdim=True)
    s = ((p - pm) * (y - ym)).mean(1, keepdim=True) / ((p - pm).pow(2).mean(1, keepdim=True) + 1e-6)
    return (s * (p - pm) + ym - y).pow(2).mean(1)


class GenerativeHead(nn.Module):
    """Connector + DepthHead: the GEM auxiliary objective on the VLM's image-token hidden states."""

    def __init__(self, c: DepthHeadConfig):
        super().__init__()
        self.cfg = c
        self.connector = Connector(c.llm_dim, c.cond_dim)
        self.head = DepthHead(c)

    def loss(self, image_hidden, target, valid=None):
        """image_hidden (B, N, D), target (B, C, S, S) in [0, 1], valid (B,) bool -> scalar.

        Mean over valid samples only; a batch without any valid sample gives 0.0 that still has a graph
        (so DDP / the optimizer see the same parameters every step).
        """
        B, C, S = target.shape[0], self.cfg.channels, self.cfg.out_size
        if tuple(target.shape[1:]) != (C, S, S):
            raise ValueError(f"depth head target: shape {tuple(target.shape)}, expected (B, {C}, {S}, {S}) "
                             f"for target={self.cfg.target!r}, out_size={S}")
        valid = torch.ones(B, dtype=torch.bool, device=target.device) if valid is None else valid.bool()
        cond = self.connector(image_hidden)  # (B, N, cond)
        # invalid samples may carry garbage targets (NaN): zero them so 0 * NaN never reaches a gradient
        x0 = torch.where(valid[:, None, None, None], target.nan_to_num(0.0), 0.0).to(cond.dtype) * 2 - 1
        if self.cfg.objective == "regress":
            pred = self.head(torch.zeros_like(x0), torch.zeros(B, device=x0.device), cond)
            per = ssi_loss(pred.float(), x0.float())  # (B,)
        else:
            drop = torch.rand(B, device=x0.device) < self.cfg.cfg_drop
            cond = cond.masked_fill(drop[:, None, None], 0.0)  # zeroed condition for CFG
            t = torch.rand(B, device=x0.device)
            noise = torch.randn_like(x0)
            xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
            per = (self.head(xt, t, cond) - (noise - x0)).float().pow(2).flatten(1).mean(1)  # (B,)
        return (per * valid).sum() / valid.sum().clamp(min=1)

    @torch.no_grad()
    def sample(self, image_hidden, steps: int = 30, cfg_scale: float = 5.0, generator=None):
        """-> generated target (B, C, S, S) in [0, 1] (for `regress`: defined up to scale and shift)."""
        x = self.head.sample(self.connector(image_hidden), steps, cfg_scale, generator)
        return ((x.float() + 1) / 2).clamp(0, 1)
