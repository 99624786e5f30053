"""Independent implementations that the exercise grading tests compare against, written differently from
the reference on purpose (complex numbers, explicit loops, float64), so a test never compares a function
with itself. Medium-tier tests also patch them in for the OTHER holes a module calls (rope, attention,
euler): a cut tree then fails an exercise's tests with that exercise's own error only."""
import math

import numpy as np
import torch


def rope_complex(x, cos, sin):
    """Rotate pair (x[i], x[i + hd/2]) as the complex number x[i] + 1j x[i + hd/2] by the angle whose cosine
    and sine are cos[..., i], sin[..., i]."""
    h = x.shape[-1] // 2
    z = torch.complex(x[..., :h].double(), x[..., h:].double())
    w = torch.complex(cos[..., :h].double(), sin[..., :h].double())
    r = z * w
    return torch.cat([r.real, r.imag], dim=-1).to(x.dtype)


def rope_interleaved(x, cos, sin):
    """The other layout (GPT-NeoX vs GPT-J): pairs (x[2i], x[2i+1]). Only used to name a mistake."""
    h = x.shape[-1] // 2
    z = torch.complex(x[..., 0::2].double(), x[..., 1::2].double()) * torch.complex(cos[..., :h].double(), sin[..., :h].double())
    return torch.stack([z.real, z.imag], dim=-1).flatten(-2).to(x.dtype)


def attention_loop(q, k, v, mask=None, is_causal=False):
    """Softmax attention one (batch, head) at a time in float64. Query head h reads kv head h // (H // KV);
    causal = query t (of T, the LAST T of S positions) sees keys 0 .. S - T + t."""
    B, H, T, hd = q.shape
    KV, S = k.shape[1], k.shape[2]
    out = torch.zeros(B, H, T, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            g = h // (H // KV)
            s = q[b, h].double() @ k[b, g].double().T / math.sqrt(hd)  # (T, S)
            allow = torch.ones(T, S, dtype=torch.bool)
            allow &= (torch.arange(S)[None, :] <= torch.arange(S - T, S)[:, None]) | (not is_causal)
            if mask is not None:
                allow &= mask[b, 0].expand(T, S)
            s = s.masked_fill(~allow, -math.inf)
            out[b, h] = torch.softmax(s, dim=-1) @ v[b, g].double()
    return out.to(q.dtype)


def attention_fast(q, k, v, mask=None, is_causal=False):
    """What medium-tier tests patch in for model.attention: the loop oracle's maths, vectorised."""
    H, KV = q.shape[1], k.shape[1]
    k = torch.stack([k[:, h // (H // KV)] for h in range(H)], dim=1)
    v = torch.stack([v[:, h // (H // KV)] for h in range(H)], dim=1)
    s = torch.einsum("bhtd,bhsd->bhts", q, k) / math.sqrt(q.shape[-1])
    T, S = s.shape[-2:]
    s = s.masked_fill((torch.arange(S)[None, :] > torch.arange(S - T, S)[:, None]) & bool(is_causal), -math.inf)
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf)
    return torch.einsum("bhts,bhsd->bhtd", torch.softmax(s, dim=-1), v)


def euler(velocity, noise, steps):
    """Euler from t = 1 to t = 0: n steps of size -1/n, the velocity read at the start of each step."""
    x, dt = noise.clone(), 1.0 / steps
    for n in range(steps, 0, -1):
        x = x + (-dt) * velocity(x, torch.full((noise.shape[0],), n * dt))
    return x


def flow_pair(x0, noise, t):
    """x_t on the straight line from x0 (t = 0) to noise (t = 1) and its time derivative."""
    tt = t.reshape([-1] + [1] * (x0.dim() - 1))
    return x0 + tt * (noise - x0), noise - x0


def percentile_linear(values: np.ndarray, q: float) -> float:
    """numpy's default 'linear' percentile, by hand: rank q/100 * (n-1) between the sorted neighbours."""
    s = np.sort(values.ravel())
    r = q / 100.0 * (len(s) - 1)
    lo = int(math.floor(r))
    hi = min(lo + 1, len(s) - 1)
    return float(s[lo] + (r - lo) * (s[hi] - s[lo]))


def block_mean(a: np.ndarray, size: int) -> np.ndarray:
    """(H, W) -> (size, size) mean over equal blocks (H, W multiples of size): area resize."""
    H, W = a.shape
    return a.reshape(size, H // size, size, W // size).mean(axis=(1, 3))
