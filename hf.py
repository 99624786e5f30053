"""Real backbones for the `hf` preset: local Hugging Face SigLIP / Qwen3 directories (config.json +
*.safetensors, nothing downloaded) -> our hand-written modules, through explicit key maps.

Paper -> code map
  Qwen3 LLM weights                    load_hf_qwen3 -> model.LanguageModel (tests: logits equal Qwen3ForCausalLM's)
  SigLIP vision tower weights          load_hf_siglip_vision -> model.VisionEncoder (image size from config.json,
                                       mean/std from preprocessor_config.json: siglip_preprocessing)
  the VLM from the two                 gem_from_hf -> model.GEM (the merger starts fresh; odd patch grids padded)
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os

import torch

from model import GEM, GEMConfig, LanguageModel, VisionEncoder, load_tensors


def _read_hf_dir(path):
    from safetensors.torch import load_file
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"{cfg_file}: missing (expected a Hugging Face model directory)")
    with open(cfg_file) as f:
        config = json.load(f)
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights (only safetensors are supported)")
    tensors = {}
    for f in files:
        tensors.update(load_file(f))
    return config, tensors


def _take(tensors, key, path):
    if key not in tensors:
        raise KeyError(f"{path}: tensor {key!r} not found in the safetensors files")
    return tensors[key].float()


def load_hf_qwen3(path: str) -> LanguageModel:
    """Hugging Face Qwen3ForCausalLM directory (config.json + *.safetensors) -> LanguageModel (fp32)."""
    hf, t = _read_hf_dir(path)
    if hf.get("attention_bias") or hf.get("use_sliding_window"):
        raise ValueError(f"{path}/config.json: attention_bias / sliding window are not supported")
    rope_params = hf.get("rope_parameters") or {}
    theta = rope_params.get("rope_theta", hf.get("rope_theta", 1e6))
    if rope_params.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
        raise ValueError(f"{path}/config.json: only default RoPE is supported")
    c = GEMConfig(vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                  n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                  head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
                  mlp_dim=hf["intermediate_size"], rope_theta=float(theta), norm_eps=hf.get("rms_norm_eps", 1e-6),
                  tie_embeddings=bool(hf.get("tie_word_embeddings", False)))  # its vit_* fields are unused
    g = lambda k: _take(t, k, path)  # noqa: E731
    sd = {"embed.weight": g("model.embed_tokens.weight"), "norm.weight": g("model.norm.weight")}
    if not c.tie_embeddings:
        sd["lm_head.weight"] = g("lm_head.weight")
    for i in range(c.n_layers):
        p, o = f"model.layers.{i}.", f"layers.{i}."
        sd[o + "attn_norm.weight"] = g(p + "input_layernorm.weight")
        sd[o + "mlp_norm.weight"] = g(p + "post_attention_layernorm.weight")
        sd[o + "attn.qkv.weight"] = torch.cat([g(p + f"self_attn.{n}_proj.weight") for n in "qkv"])
        sd[o + "attn.proj.weight"] = g(p + "self_attn.o_proj.weight")
        sd[o + "attn.q_norm.weight"] = g(p + "self_attn.q_norm.weight")
        sd[o + "attn.k_norm.weight"] = g(p + "self_attn.k_norm.weight")
        sd[o + "mlp.gate_up.weight"] = torch.cat([g(p + "mlp.gate_proj.weight"), g(p + "mlp.up_proj.weight")])
        sd[o + "mlp.down.weight"] = g(p + "mlp.down_proj.weight")
    model = LanguageModel(c)
    load_tensors(model, sd, path)
    return model


def siglip_preprocessing(path: str, image_size: int):
    """-> (mean, std) per channel that the SigLIP checkpoint in `path` was trained with, from its
    preprocessor_config.json (image_mean, image_std, do_normalize; its size must equal config.json's
    image_size). Without that file: SigLIP's usual mean = std = 0.5 (= our [-1, 1] pixels), said on stdout."""
    f = os.path.join(path, "preprocessor_config.json")
    if not os.path.isfile(f):
        print(f"note: {f} missing: assuming SigLIP's usual normalisation (mean = std = 0.5) and config.json's "
              f"image_size={image_size}", flush=True)
        return (0.5,) * 3, (0.5,) * 3
    with open(f) as fh:
        p = json.load(fh)
    if not p.get("do_rescale", True) or abs(p.get("rescale_factor", 1 / 255) * 255 - 1) > 1e-6:
        raise ValueError(f"{f}: only pixels rescaled by 1/255 are supported (do_rescale, rescale_factor)")
    size = p.get("size") or {}
    side = size.get("shortest_edge", image_size)
    h, w = size.get("height", side), size.get("width", side)
    if (h, w) != (image_size, image_size):
        raise ValueError(f"{f}: size {h}x{w} but config.json has image_size={image_size}")
    if not p.get("do_normalize", True):
        return (0.0,) * 3, (1.0,) * 3  # the ViT takes x/255 as it is
    per_channel = lambda v: tuple(float(x) for x in (v if isinstance(v, (list, tuple)) else [v] * 3))  # noqa: E731
    mean, std = per_channel(p.get("image_mean", 0.5)), per_channel(p.get("image_std", 0.5))
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"{f}: image_mean / image_std need 3 channels, got {mean} / {std}")
    return mean, std


def load_hf_siglip_vision(path: str) -> VisionEncoder:
    """Hugging Face SiglipVisionModel (or full SiglipModel) directory -> VisionEncoder (fp32).
    The attention-pooling head is not used (GEM feeds all patch features to the merger). Image size from
    config.json; normalisation from preprocessor_config.json (siglip_preprocessing), applied inside the
    encoder, so the data keeps giving [-1, 1] pixels resized to cfg.image_size."""
    hf, t = _read_hf_dir(path)
    hf = hf.get("vision_config", hf)
    if hf.get("hidden_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise ValueError(f"{path}/config.json: hidden_act {hf['hidden_act']!r} is not supported")
    image_size = hf.get("image_size", 224)
    mean, std = siglip_preprocessing(path, image_size)
    c = GEMConfig(image_size=image_size, patch_size=hf.get("patch_size", 16),
                  vit_dim=hf.get("hidden_size", 768), vit_layers=hf.get("num_hidden_layers", 12),
                  vit_heads=hf.get("num_attention_heads", 12), vit_mlp=hf.get("intermediate_size", 3072),
                  vit_eps=hf.get("layer_norm_eps", 1e-6), image_mean=mean, image_std=std)  # its LLM fields are unused
    # SigLIP checkpoints on the Hub prefix keys with "vision_model."; transformers 5 saves them without
    pre = "vision_model." if "vision_model.embeddings.patch_embedding.weight" in t else ""
    g = lambda k: _take(t, pre + k, path)  # noqa: E731
    sd = {"patch.weight": g("embeddings.patch_embedding.weight"), "patch.bias": g("embeddings.patch_embedding.bias"),
          "pos_embed": g("embeddings.position_embedding.weight"),
          "post_norm.weight": g("post_layernorm.weight"), "post_norm.bias": g("post_layernorm.bias")}
    for i in range(c.vit_layers):
        p, o = f"encoder.layers.{i}.", f"blocks.{i}."
        for w in ("weight", "bias"):
            sd[o + "norm1." + w] = g(p + "layer_norm1." + w)
            sd[o + "norm2." + w] = g(p + "layer_norm2." + w)
            sd[o + "qkv." + w] = torch.cat([g(p + f"self_attn.{n}_proj." + w) for n in "qkv"])
            sd[o + "proj." + w] = g(p + "self_attn.out_proj." + w)
            sd[o + "fc1." + w] = g(p + "mlp.fc1." + w)
            sd[o + "fc2." + w] = g(p + "mlp.fc2." + w)
    model = VisionEncoder(c)
    load_tensors(model, sd, path)
    return model


def gem_from_hf(vit_path, llm_path, **overrides) -> GEM:
    """A GEM whose ViT and LLM come from local SigLIP / Qwen3 directories; the merger starts fresh.
    Image size and normalisation are the SigLIP checkpoint's (load_hf_siglip_vision)."""
    vit, llm = load_hf_siglip_vision(vit_path), load_hf_qwen3(llm_path)
    vit_fields = ("image_size", "patch_size", "vit_dim", "vit_layers", "vit_heads", "vit_mlp", "vit_eps",
                  "image_mean", "image_std")
    model = GEM(dataclasses.replace(llm.cfg, **{k: getattr(vit.cfg, k) for k in vit_fields}, **overrides))
    model.vit.load_state_dict(vit.state_dict())
    model.llm.load_state_dict(llm.state_dict())
    return model
