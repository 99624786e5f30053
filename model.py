"""GEM-mini model: vision encoder, patch merger, Qwen3-style LLM and the GEM VLM wrapper.

GEM = ViT -> 2x2 patch merger -> decoder LLM. The merged visual tokens replace the `<|image_pad|>`
placeholders in the text; the LLM's final-normed last-layer hidden states at those positions
(`out["image_hidden"]`) condition the generative depth head (depth_head.py).

Use:
    cfg = GEMConfig(**MODEL_PRESETS["tiny"], vocab_size=len(tok), image_pad_id=...)   # see data.special_ids
    model = GEM(cfg)
    out = model(input_ids, pixel_values, attention_mask, labels)   # dict(loss, logits, image_hidden, ...)
    new_ids = model.generate(prompt_ids, pixel_values, max_new_tokens=32)
    model.save_pretrained("runs/x/ckpt");  model = GEM.from_pretrained("runs/x/ckpt")

Paper -> code map (PAPER.md "Architecture")
  Qwen3-VL vision tower (ViT, patch 16)     VisionEncoder   (pre-norm ViT, SigLIP-compatible weights)
  2x2 merger MLP                             Merger          (LayerNorm -> concat 2x2 -> Linear-GELU-Linear;
                                                             odd patch grids zero-padded: 27x27 -> 14x14)
  Qwen3 LLM (RMSNorm, RoPE, GQA, q/k-norm)   LanguageModel, Block, Attention, SwiGLU, RMSNorm, rope()
  visual tokens spliced at <|image_pad|>     GEM.embed
  condition = last-layer hidden at image     GEM.forward -> out["image_hidden"] (B, n_image_tokens, dim)
  tokens (for the depth head)
  L_CE on assistant tokens                   lm_loss, called by GEM.forward (labels == -100 ignored)
  hidden states of every layer (GEM-VLA:     GEM.forward(output_hidden_states=True) -> out["hidden_states"]
  block i cross-attends to layer i)          (n_layers + 1 entries, Hugging Face convention: embeddings,
                                              layer outputs, the last one final-normed)
  inference                                  GEM.generate -> LanguageModel.generate (KVCache, greedy or
                                              temperature; left-padded batches); GEM.answer: batched
                                              greedy answers to prompts of any lengths
  real backbones (hf preset)                 hf.py (local SigLIP / Qwen3 safetensors -> these modules);
                                              VisionEncoder.features maps [-1, 1] pixels to the SigLIP's mean/std
Speed notes: attention is F.scaled_dot_product_attention with native GQA; no padding or right padding
takes the is_causal fast path (no mask tensor); q/k/v and gate/up projections are fused matmuls; the
KV cache is preallocated. `SDPA = False` switches to a plain softmax path (tests check they agree).
bench/bench_llm.py times the LLM against Hugging Face transformers' Qwen3ForCausalLM.

Checkpoints: GEM.save_pretrained / from_pretrained through common.py's atomic checkpoint I/O;
load_tensors(module, tensors, source) is the strict, shape-checked loader with one-line errors.
"""
from __future__ import annotations

import dataclasses
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import config_from_dict, config_to_dict, load_checkpoint, save_checkpoint


@dataclasses.dataclass
class GEMConfig:
    # vision encoder (ViT); image_size // patch_size patches per side (the conv drops any remainder: 384 // 14 = 27)
    image_size: int = 64
    patch_size: int = 8
    vit_dim: int = 128
    vit_layers: int = 4
    vit_heads: int = 4
    vit_mlp: int = 512
    vit_eps: float = 1e-6
    merge: int = 2  # merge x merge neighbouring patches -> one LLM token (odd grids are padded: Merger)
    # the ViT's input normalisation, (x/255 - mean) / std per channel (hf: the SigLIP checkpoint's
    # preprocessor_config.json); the data gives [-1, 1], i.e. 0.5 / 0.5, converted in VisionEncoder.features
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    # language model (Qwen3-style)
    vocab_size: int = 2048
    dim: int = 192
    n_layers: int = 6
    n_heads: int = 6
    n_kv_heads: int = 2
    head_dim: int = 32
    mlp_dim: int = 512
    rope_theta: float = 1e6
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    # special token ids (set from the tokenizer by the training script: data.special_ids)
    pad_id: int = 0
    vision_start_id: int = 3
    vision_end_id: int = 4
    image_pad_id: int = 5

    @property
    def grid(self) -> int:  # merged visual tokens per side: ceil(patches / merge), odd grids padded (Merger)
        return -(-(self.image_size // self.patch_size) // self.merge)

    @property
    def n_image_tokens(self) -> int:
        return self.grid ** 2


# Model sizes per preset (vocab_size and token ids come from the tokenizer). tiny: ViT ~0.8M, LLM ~3M.
MODEL_PRESETS = {
    "micro": dict(image_size=32, patch_size=8, vit_dim=32, vit_layers=1, vit_heads=2, vit_mlp=64,
                  dim=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, mlp_dim=64),
    "tiny": dict(image_size=64, patch_size=8, vit_dim=128, vit_layers=4, vit_heads=4, vit_mlp=512,
                 dim=192, n_layers=6, n_heads=6, n_kv_heads=2, head_dim=32, mlp_dim=512),
    "small": dict(image_size=128, patch_size=8, vit_dim=384, vit_layers=8, vit_heads=6, vit_mlp=1536,
                  dim=512, n_layers=12, n_heads=8, n_kv_heads=2, head_dim=64, mlp_dim=1536),
}


# ----------------------------------------------------------------------------------------------------
# Attention: one function for the ViT (full) and the LLM (causal, padded, cached)

SDPA = True  # False: the plain softmax reference path below (tests compare the two)


def attention(q, k, v, mask=None, is_causal=False):
    """q (B, H, T, hd), k/v (B, KV, S, hd) with H % KV == 0 (GQA); mask (B, 1, T, S) bool, True = attend."""
    # >>> exercise: attention
    if SDPA:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                              enable_gqa=k.shape[1] != q.shape[1])
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, H, S, hd)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    if is_causal:
        T, S = scores.shape[-2:]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v  # (B, H, T, hd)
    # <<< exercise


# ----------------------------------------------------------------------------------------------------
# Vision encoder: SigLIP-style pre-norm ViT, then the Qwen-VL 2x2 merger

class ViTBlock(nn.Module):
    def __init__(self, c: GEMConfig):
        super().__init__()
        self.n_heads = c.vit_heads
        self.norm1 = nn.LayerNorm(c.vit_dim, eps=c.vit_eps)
        self.qkv = nn.Linear(c.vit_dim, 3 * c.vit_dim)  # fused q, k, v (SigLIP stores them separately: see loader)
        self.proj = nn.Linear(c.vit_dim, c.vit_dim)
        self.norm2 = nn.LayerNorm(c.vit_dim, eps=c.vit_eps)
        self.fc1 = nn.Linear(c.vit_dim, c.vit_mlp)
        self.fc2 = nn.Linear(c.vit_mlp, c.vit_dim)

    def forward(self, x):  # (B, N, D)
        # >>> exercise: vit_block
        B, N, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, N, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)  # (B, H, N, hd)
        a = attention(q, k, v).transpose(1, 2).reshape(B, N, D)  # bidirectional: every patch sees every patch
        x = x + self.proj(a)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))
        # <<< exercise


class VisionEncoder(nn.Module):
    def __init__(self, c: GEMConfig):
        super().__init__()
        self.cfg = c
        self.side = c.image_size // c.patch_size
        self.patch = nn.Conv2d(3, c.vit_dim, c.patch_size, stride=c.patch_size)
        self.pos_embed = nn.Parameter(torch.randn(self.side ** 2, c.vit_dim) * 0.02)  # learned, one per patch
        self.blocks = nn.ModuleList(ViTBlock(c) for _ in range(c.vit_layers))
        self.post_norm = nn.LayerNorm(c.vit_dim, eps=c.vit_eps)
        # [-1, 1] pixels p = (x/255 - 0.5) / 0.5  ->  (x/255 - mean) / std = p * 0.5/std + (0.5 - mean)/std:
        # one affine map per channel, exactly the identity for mean = std = 0.5 (not saved: it is the config's)
        mean, std = torch.tensor(c.image_mean).view(1, 3, 1, 1), torch.tensor(c.image_std).view(1, 3, 1, 1)
        self.register_buffer("pix_scale", 0.5 / std, persistent=False)
        self.register_buffer("pix_shift", (0.5 - mean) / std, persistent=False)

    def features(self, pixel_values):
        """pixel_values (B, 3, H, W) in [-1, 1] (data.to_pixel_values) -> final post-layernorm patch features
        (B, N, D), row-major. The ViT sees them in its checkpoint's normalisation (cfg.image_mean / image_std)."""
        if pixel_values.shape[-2:] != (self.cfg.image_size,) * 2:
            raise ValueError(f"pixel_values: image size {tuple(pixel_values.shape[-2:])} but the model config "
                             f"has image_size={self.cfg.image_size}")
        pixel_values = pixel_values * self.pix_scale + self.pix_shift  # the ONE place the normalisation changes
        x = self.patch(pixel_values).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, D)
        for blk in self.blocks:
            x = blk(x)
        return self.post_norm(x)

    forward = features


class Merger(nn.Module):
    """Concatenate each m x m block of neighbouring patches and project to the LLM width (Qwen2-VL).

    Odd patch grids are PADDED, not cropped: SigLIP-so400m-384 has 384 // 14 = 27 x 27 patches, extended at
    the bottom and right to 28 x 28 with zero features, so 14 x 14 merged tokens (GEMConfig.grid =
    ceil(patches / merge); the depth head's condition grid is the same). Why: cropping to 26 x 26 would hide
    the image's last 14-px strip from the LLM (grounding near the right or bottom edge), while the depth
    target still covers the whole image. Qwen2-VL never meets the case because it resizes images to
    multiples of 28; a SigLIP's learned position table is for one fixed grid, and padding after the encoder
    keeps the pretrained ViT exactly as trained. The zeros go in AFTER this module's LayerNorm (before it,
    LayerNorm would turn them into its bias), so a padded slot adds nothing to fc1: an edge token is a
    function of its real patches alone.
    """

    def __init__(self, vit_dim: int, llm_dim: int, merge: int = 2, eps: float = 1e-6):
        super().__init__()
        self.m = merge
        self.norm = nn.LayerNorm(vit_dim, eps=eps)
        self.fc1 = nn.Linear(vit_dim * merge ** 2, vit_dim * merge ** 2)
        self.fc2 = nn.Linear(vit_dim * merge ** 2, llm_dim)

    def forward(self, x):  # (B, N, Dv), N = s * s patches in row-major order
        # >>> exercise: merger
        B, N, D = x.shape
        s, m = math.isqrt(N), self.m
        if s * s != N:
            raise ValueError(f"Merger: {N} patch features do not form a square grid")
        g = -(-s // m)  # merged tokens per side (= GEMConfig.grid)
        x = self.norm(x).view(B, s, s, D)
        if g * m != s:  # odd grid: zero patches at the bottom and the right (class docstring)
            x = F.pad(x, (0, 0, 0, g * m - s, 0, g * m - s))  # (B, g*m, g*m, Dv)
        x = x.view(B, g, m, g, m, D).permute(0, 1, 3, 2, 4, 5)  # (B, g, g, m, m, Dv)
        x = x.reshape(B, g * g, m * m * D)  # (B, g*g, m*m*Dv): tokens row-major over the merged grid
        return self.fc2(F.gelu(self.fc1(x)))  # (B, g*g, D_llm)
        # <<< exercise


# ----------------------------------------------------------------------------------------------------
# Language model: Qwen3-style decoder

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope(x, cos, sin):
    """Rotary embedding, 'rotate half' layout (Qwen/Llama). x (B, H, T, hd), cos/sin (B, 1, T, hd)."""
    # >>> exercise: rope
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin
    # <<< exercise


class KVCache:
    """Preallocated keys/values for all layers; `pos` = number of tokens already cached."""

    def __init__(self, c: GEMConfig, batch: int, max_len: int, device, dtype):
        shape = (c.n_layers, batch, c.n_kv_heads, max_len, c.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0

    def update(self, layer: int, k, v):  # k/v (B, KV, T, hd) -> all cached so far (B, KV, pos+T, hd)
        end = self.pos + k.shape[2]
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Attention(nn.Module):
    def __init__(self, c: GEMConfig, layer: int):
        super().__init__()
        self.c, self.layer = c, layer
        self.qkv = nn.Linear(c.dim, (c.n_heads + 2 * c.n_kv_heads) * c.head_dim, bias=False)  # fused q, k, v
        self.proj = nn.Linear(c.n_heads * c.head_dim, c.dim, bias=False)
        self.q_norm = RMSNorm(c.head_dim, c.norm_eps)  # Qwen3: per-head RMSNorm on q and k, before RoPE
        self.k_norm = RMSNorm(c.head_dim, c.norm_eps)

    def forward(self, x, cos, sin, mask, is_causal, cache):
        # >>> exercise: llm_block
        B, T, _ = x.shape
        H, KV, hd = self.c.n_heads, self.c.n_kv_heads, self.c.head_dim
        q, k, v = self.qkv(x).view(B, T, H + 2 * KV, hd).split((H, KV, KV), dim=2)  # (B, T, heads, hd)
        q = rope(self.q_norm(q).transpose(1, 2), cos, sin)  # (B, H, T, hd)
        k = rope(self.k_norm(k).transpose(1, 2), cos, sin)  # (B, KV, T, hd)
        v = v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, KV, S, hd)
        y = attention(q, k, v, mask, is_causal)  # (B, H, T, hd)
        return self.proj(y.transpose(1, 2).reshape(B, T, H * hd))
        # <<< exercise


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)  # fused gate and up projections
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, c: GEMConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(c.dim, c.norm_eps)
        self.attn = Attention(c, layer)
        self.mlp_norm = RMSNorm(c.dim, c.norm_eps)
        self.mlp = SwiGLU(c.dim, c.mlp_dim)

    def forward(self, x, cos, sin, mask, is_causal, cache):
        # >>> exercise: llm_block
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, is_causal, cache)
        return x + self.mlp(self.mlp_norm(x))
        # <<< exercise


class LanguageModel(nn.Module):
    def __init__(self, c: GEMConfig):
        super().__init__()
        self.cfg = c
        self.embed = nn.Embedding(c.vocab_size, c.dim)
        self.layers = nn.ModuleList(Block(c, i) for i in range(c.n_layers))
        self.norm = RMSNorm(c.dim, c.norm_eps)
        # tied: the output projection reuses embed.weight (no separate tensor, so no duplicate key on save)
        self.lm_head = None if c.tie_embeddings else nn.Linear(c.dim, c.vocab_size, bias=False)

    def unembed(self, h):  # (B, T, D) final-normed -> (B, T, V) logits
        return F.linear(h, self.embed.weight if self.lm_head is None else self.lm_head.weight)

    def logits(self, input_ids, attention_mask=None):
        return self.unembed(self(input_ids, attention_mask=attention_mask)[0])

    def _mask(self, attention_mask, T, past, device):
        """-> (mask (B, 1, T, S) bool or None, is_causal). Fast paths avoid building a mask at all."""
        if attention_mask is not None and past == 0:
            # right padding needs no mask: causal attention already hides pads that come after real tokens
            if not (attention_mask[:, 1:] & ~attention_mask[:, :-1]).any():
                attention_mask = None
        elif attention_mask is not None and attention_mask.all():
            attention_mask = None
        if attention_mask is None:
            if past == 0 or T == 1:  # prefill: plain causal; one new token: it may see everything cached
                return None, past == 0 and T > 1
        S = past + T
        qpos = torch.arange(past, S, device=device)[:, None]
        kpos = torch.arange(S, device=device)[None]
        allowed = kpos <= qpos  # (T, S)
        if attention_mask is not None:
            # a pad query still sees itself, so no softmax row is empty (its output is never used)
            allowed = (allowed & attention_mask[:, None, :S]) | (kpos == qpos)  # (B, T, S)
        return allowed.expand(attention_mask.shape[0] if attention_mask is not None else 1, T, S)[:, None], False

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, cache: KVCache | None = None,
                output_hidden_states=False):
        """-> (final-normed hidden (B, T, D), list of n_layers+1 hidden states or None).

        attention_mask (B, S) bool covers the cached tokens too (S = cache.pos + T); left or right padding.
        """
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        B, T, _ = x.shape
        past = cache.pos if cache is not None else 0
        if attention_mask is not None:
            attention_mask = attention_mask.bool()
            # positions count real tokens only, so a left-padded prompt starts at position 0
            pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:past + T]  # (B, T)
        else:
            pos = torch.arange(past, past + T, device=x.device)[None]  # (1, T)
        # RoPE frequencies in fp32, computed here (not a buffer) so model.to(bfloat16) cannot round them
        hd = self.cfg.head_dim
        inv_freq = self.cfg.rope_theta ** (-torch.arange(0, hd, 2, device=x.device, dtype=torch.float) / hd)
        freqs = pos[..., None].float() * inv_freq  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hd)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        mask, is_causal = self._mask(attention_mask, T, past, x.device)
        hidden = [x] if output_hidden_states else None
        for layer in self.layers:
            x = layer(x, cos, sin, mask, is_causal, cache)
            if output_hidden_states:
                hidden.append(x)
        if cache is not None:
            cache.pos += T
        x = self.norm(x)
        if output_hidden_states:
            hidden[-1] = x  # Hugging Face convention: the last entry is final-normed
        return x, hidden

    @torch.no_grad()
    def generate(self, input_ids=None, inputs_embeds=None, attention_mask=None, max_new_tokens=32,
                 temperature=0.0, eos_id=None, pad_id=0, generator=None):
        """Greedy (temperature 0) or sampled continuation with a KV cache -> (B, new_T) long.

        Batches must be left-padded (every prompt ends at the last column). After eos a row emits
        pad_id; generation stops early once every row has finished.
        """
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        B, T, _ = x.shape
        mask = attention_mask.bool() if attention_mask is not None else None
        if mask is not None and not mask[:, -1].all():
            raise ValueError("generate: batches must be left-padded (attention_mask[:, -1] all True)")
        cache = KVCache(self.cfg, B, T + max_new_tokens, x.device, x.dtype)
        h, _ = self(inputs_embeds=x, attention_mask=mask, cache=cache)
        logits = self.unembed(h[:, -1])  # (B, V): only the last position is needed
        done = torch.zeros(B, dtype=torch.bool, device=x.device)
        out = []
        for step in range(max_new_tokens):
            if temperature > 0:
                probs = (logits.float() / temperature).softmax(-1)
                nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            else:
                nxt = logits.argmax(-1)
            nxt = nxt.masked_fill(done, pad_id)
            out.append(nxt)
            done = done | (nxt == eos_id) if eos_id is not None else done
            if (eos_id is not None and done.all()) or step == max_new_tokens - 1:  # every row ended, or the last token
                break
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
            h, _ = self(nxt[:, None], attention_mask=mask, cache=cache)  # one token, attends to the cache
            logits = self.unembed(h[:, -1])
        return torch.stack(out, 1) if out else torch.zeros(B, 0, dtype=torch.long, device=x.device)


# ----------------------------------------------------------------------------------------------------
# GEM: the VLM

def lm_loss(logits, labels):
    """Mean next-token cross-entropy over labels != -100: position t predicts labels[t + 1].
    Shifting the labels (not the logits) avoids copying the (B, T, V) logits."""
    tgt = F.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1)  # (B*T,)
    ce = F.cross_entropy(logits.flatten(0, 1).float(), tgt, ignore_index=-100, reduction="sum")
    return ce / (tgt != -100).sum().clamp(min=1)  # all ignored -> 0.0, not nan


class GEM(nn.Module):
    def __init__(self, cfg: GEMConfig):
        super().__init__()
        if cfg.image_size < cfg.patch_size:
            raise ValueError(f"GEMConfig: image_size={cfg.image_size} is smaller than patch_size={cfg.patch_size}")
        self.cfg = cfg
        self.vit = VisionEncoder(cfg)
        self.merger = Merger(cfg.vit_dim, cfg.dim, cfg.merge, cfg.vit_eps)
        self.llm = LanguageModel(cfg)
        for m in self.modules():  # N(0, 0.02) weights, zero biases (GPT-2 style)
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def embed(self, input_ids, pixel_values):
        """Token embeddings with the merged visual tokens spliced in at the <|image_pad|> positions."""
        x = self.llm.embed(input_ids)  # (B, T, D)
        is_img = input_ids == self.cfg.image_pad_id  # (B, T)
        if pixel_values is None:
            if is_img.any():
                raise ValueError("input_ids contain <|image_pad|> tokens but pixel_values is None")
            return x, is_img
        vis = self.merger(self.vit.features(pixel_values.to(x.dtype)))  # (B, n_image_tokens, D)
        counts = is_img.sum(1)
        if (counts != vis.shape[1]).any():
            raise ValueError(f"input_ids: each sample needs exactly {vis.shape[1]} image_pad tokens "
                             f"(id {self.cfg.image_pad_id}), got {counts.tolist()}")
        # masked_scatter fills the True positions in row-major order: sample b gets vis[b] in patch order
        # (under autocast the ViT output is bf16 while the embedding table is fp32: cast to the text's dtype)
        return x.masked_scatter(is_img[..., None], vis.to(x.dtype)), is_img

    def forward(self, input_ids, pixel_values=None, attention_mask=None, labels=None, output_hidden_states=False):
        x, is_img = self.embed(input_ids, pixel_values)
        h, hidden = self.llm(inputs_embeds=x, attention_mask=attention_mask, output_hidden_states=output_hidden_states)
        logits = self.llm.unembed(h)  # (B, T, V)
        loss = lm_loss(logits, labels) if labels is not None else None
        B = input_ids.shape[0]
        image_hidden = h[is_img].view(B, -1, h.shape[-1])  # (B, n_image_tokens, D), in patch order
        return dict(loss=loss, logits=logits, image_hidden=image_hidden, hidden_states=hidden)

    @torch.no_grad()
    def generate(self, input_ids, pixel_values=None, attention_mask=None, max_new_tokens=32, temperature=0.0,
                 eos_id=None, generator=None):
        """Greedy (temperature 0) or sampled continuation with a KV cache -> (B, new_T) long.
        Batches must be left-padded; see LanguageModel.generate."""
        x, _ = self.embed(input_ids, pixel_values)
        return self.llm.generate(inputs_embeds=x, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                 temperature=temperature, eos_id=eos_id, pad_id=self.cfg.pad_id, generator=generator)

    @torch.no_grad()
    def answer(self, prompts: list[list[int]], pixel_values, max_new_tokens: int, eos_id: int,
               batch_size: int = 32) -> list[list[int]]:
        """Batched greedy answers: prompt ids (any lengths) and their images (N, 3, H, W) -> each answer's
        ids, cut before eos_id. Each batch is left-padded, as generate needs (every prompt ends last)."""
        dev, out = next(self.parameters()).device, []
        for s in range(0, len(prompts), batch_size):
            chunk = prompts[s:s + batch_size]
            T = max(map(len, chunk))
            ids = torch.tensor([[self.cfg.pad_id] * (T - len(p)) + p for p in chunk], device=dev)  # (B, T)
            mask = torch.tensor([[False] * (T - len(p)) + [True] * len(p) for p in chunk], device=dev)
            gen = self.generate(ids, pixel_values[s:s + batch_size].to(dev), attention_mask=mask,
                                max_new_tokens=max_new_tokens, eos_id=eos_id).tolist()
            out += [g[:g.index(eos_id)] if eos_id in g else g for g in gen]
        return out

    # --- checkpoints: config.json + model.safetensors via common.save_checkpoint / load_checkpoint -----------------

    def save_pretrained(self, path, extra_tensors=None, flow_convention=None, **kw):
        """Write an atomic checkpoint dir. extra_tensors (e.g. {"head." + k: v}) are stored beside the
        model's own; flow_convention (depth_head.FLOW_CONVENTION, when the checkpoint holds a generative
        head or an action expert) is recorded in config.json; **kw go to save_checkpoint (json_files,
        copy_files, train_state)."""
        tensors = {_clean(k): v for k, v in self.state_dict().items()}
        tensors.update(extra_tensors or {})
        config = config_to_dict(self.cfg) | ({"flow_convention": flow_convention} if flow_convention else {})
        save_checkpoint(path, tensors, config, **kw)

    @classmethod
    def from_pretrained(cls, path, return_extra=False):
        """-> GEM (and, if return_extra, a dict of the checkpoint's tensors that are not the GEM's).
        config.json's flow_convention is for the heads' loaders (train_pretrain.load_pretrained)."""
        tensors, config, _ = load_checkpoint(path)
        config = {k: v for k, v in config.items() if k != "flow_convention"}
        model = cls(config_from_dict(GEMConfig, config, os.path.join(path, "config.json")))
        extra = load_tensors(model, tensors, os.path.join(path, "model.safetensors"))
        return (model, extra) if return_extra else model

def _clean(key: str) -> str:
    """Strip wrappers' prefixes (torch.compile `_orig_mod.`, DDP `module.`) so keys are plain."""
    return key.replace("_orig_mod.", "").replace("module.", "") if ("_orig_mod." in key or key.startswith("module.")) else key


def load_tensors(module: nn.Module, tensors: dict, source: str) -> dict:
    """Copy `tensors` into `module`, strictly: a missing tensor or a shape mismatch is a one-line error
    naming the key and both shapes. Returns the tensors the module does not own (extras)."""
    tensors = {_clean(k): v for k, v in tensors.items()}
    own = module.state_dict()
    for k, p in own.items():
        if k not in tensors:
            raise ValueError(f"{source}: missing tensor {k!r} (checkpoint of another config or model?)")
        if tensors[k].shape != p.shape:
            raise ValueError(f"{source}: tensor {k!r} has shape {tuple(tensors[k].shape)} but this config "
                             f"expects {tuple(p.shape)} (checkpoint of another config?)")
    module.load_state_dict({k: tensors[k] for k in own})
    return {k: v for k, v in tensors.items() if k not in own}
