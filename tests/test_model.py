"""model.py: parity with Hugging Face transformers (Qwen3, SigLIP), attention paths, KV cache, save/load,
loss masking, and a tiny GEM that overfits. CPU, micro sizes."""
import pytest
import torch
import torch.nn.functional as F

import hf as H
import model as M

MICRO = dict(M.MODEL_PRESETS["micro"], vocab_size=64)


def _ids(cfg, B=2, T=12, start=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, cfg.vocab_size, (B, T), generator=g)
    ids[:, start:start + cfg.n_image_tokens] = cfg.image_pad_id
    return ids


# ---------------------------------------------------------------- parity with transformers

@pytest.mark.parametrize("heads,kv,tied", [(4, 2, True), (6, 2, False), (4, 4, False), (8, 2, True)])
def test_qwen3_parity(tmp_path, heads, kv, tied):
    import transformers as tr  # a dev requirement: a missing one fails, never skips
    torch.manual_seed(0)
    hc = tr.Qwen3Config(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                        num_attention_heads=heads, num_key_value_heads=kv, head_dim=16,
                        tie_word_embeddings=tied, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    ref = tr.Qwen3ForCausalLM(hc).eval()
    with torch.no_grad():  # norms start at 1: randomise them so a mis-mapped norm weight shows up
        for n, p in ref.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    ref.save_pretrained(tmp_path)
    ours = H.load_hf_qwen3(str(tmp_path)).eval()
    ids = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        r = ref(ids, output_hidden_states=True)
        assert torch.allclose(ours.logits(ids), r.logits, atol=1e-4)
        _, hid = ours(ids, output_hidden_states=True)
        for a, b in zip(hid, r.hidden_states, strict=True):
            assert torch.allclose(a, b, atol=1e-4)
        # left padding: positions restart at the first real token, pads are never attended
        mask = torch.ones(2, 10, dtype=torch.bool)
        mask[1, :3] = False
        r = ref(ids, attention_mask=mask.long()).logits
        assert torch.allclose(ours.logits(ids, mask)[mask], r[mask], atol=1e-4)


def test_siglip_vision_parity(tmp_path):
    import transformers as tr  # a dev requirement: a missing one fails, never skips
    torch.manual_seed(0)
    hc = tr.SiglipVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                               image_size=32, patch_size=8)
    ref = tr.SiglipVisionModel(hc).eval()
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    ref.save_pretrained(tmp_path)
    ours = H.load_hf_siglip_vision(str(tmp_path)).eval()
    px = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(ours.features(px), ref(pixel_values=px).last_hidden_state, atol=1e-4)


def test_gem_from_hf(tmp_path):
    import transformers as tr  # a dev requirement: a missing one fails, never skips
    torch.manual_seed(0)
    tr.SiglipVisionModel(tr.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=2, image_size=32, patch_size=8)).save_pretrained(tmp_path / "v")
    tr.Qwen3ForCausalLM(tr.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                       tie_word_embeddings=True)).save_pretrained(tmp_path / "l")
    g = H.gem_from_hf(str(tmp_path / "v"), str(tmp_path / "l"), image_pad_id=5)
    ids = _ids(g.cfg)
    assert g.cfg.n_image_tokens == 4 and g(ids, torch.randn(2, 3, 32, 32))["logits"].shape == (2, 12, 64)
    assert torch.equal(g.llm.embed.weight, H.load_hf_qwen3(str(tmp_path / "l")).embed.weight)


def test_merger_layout():
    """Merged token j depends exactly on the 2x2 block of patches at (row j // g, col j % g), row-major."""
    torch.manual_seed(0)
    m, side = M.Merger(vit_dim=8, llm_dim=5), 6
    x = torch.randn(1, side * side, 8)
    base = m(x)
    for p in range(side * side):
        x2 = x.clone()
        x2[0, p] += torch.randn(8)  # not a constant shift: LayerNorm would remove it
        changed = ((m(x2) - base).abs().sum(-1)[0] > 0).nonzero().flatten().tolist()
        r, c = divmod(p, side)
        assert changed == [(r // 2) * (side // 2) + c // 2]


# ---------------------------------------------------------------- attention paths

@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_sdpa_equals_plain_softmax(monkeypatch, padding):
    torch.manual_seed(0)
    cfg = M.GEMConfig(**MICRO)
    g = M.GEM(cfg).eval()
    ids, px = _ids(cfg), torch.randn(2, 3, 32, 32)
    mask = torch.ones_like(ids, dtype=torch.bool)
    if padding == "left":
        mask[1, :2] = False
    if padding == "right":
        mask[1, -3:] = False
    with torch.no_grad():
        a = g(ids, px, mask)
        monkeypatch.setattr(M, "SDPA", False)
        b = g(ids, px, mask)
    assert torch.allclose(a["logits"][mask], b["logits"][mask], atol=1e-5)
    assert torch.allclose(a["image_hidden"], b["image_hidden"], atol=1e-5)  # ViT (bidirectional) too


def test_padding_does_not_change_real_tokens():
    torch.manual_seed(0)
    cfg = M.GEMConfig(**MICRO)
    g = M.GEM(cfg).eval()
    ids, px = _ids(cfg, B=1), torch.randn(1, 3, 32, 32)
    left = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.bool), torch.ones_like(ids, dtype=torch.bool)], 1)
    with torch.no_grad():
        a = g(ids, px)["logits"]
        b = g(left, px, mask)["logits"][:, 3:]
    assert torch.allclose(a, b, atol=1e-5)


# ---------------------------------------------------------------- generation

def test_kv_cache_generation_equals_full_forward():
    torch.manual_seed(0)
    cfg = M.GEMConfig(**MICRO)
    g = M.GEM(cfg).eval()
    ids, px = _ids(cfg), torch.randn(2, 3, 32, 32)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, :2] = False  # left-padded row
    new = g.generate(ids, px, mask, max_new_tokens=6)
    seq, m = ids, mask
    with torch.no_grad():
        for t in range(6):  # no cache: rerun the whole sequence and take the argmax
            nxt = g(seq, px, m)["logits"][:, -1].argmax(-1)
            assert torch.equal(nxt, new[:, t])
            seq = torch.cat([seq, nxt[:, None]], 1)
            m = torch.cat([m, torch.ones(2, 1, dtype=torch.bool)], 1)


def test_generate_eos_and_temperature():
    torch.manual_seed(0)
    cfg = M.GEMConfig(**MICRO)
    g = M.GEM(cfg).eval()
    ids, px = _ids(cfg), torch.randn(2, 3, 32, 32)
    first = g.generate(ids, px, max_new_tokens=1)[:, 0]
    out = g.generate(ids, px, max_new_tokens=5, eos_id=int(first[0]))
    assert out[0, 0] == first[0] and (out[0, 1:] == cfg.pad_id).all()
    s1 = g.generate(ids, px, max_new_tokens=8, temperature=1.0, generator=torch.Generator().manual_seed(1))
    s2 = g.generate(ids, px, max_new_tokens=8, temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(s1, s2) and s1.shape == (2, 8)


# ---------------------------------------------------------------- save / load

def test_save_load_roundtrip_and_errors(tmp_path):
    torch.manual_seed(0)
    cfg = M.GEMConfig(**dict(MICRO, tie_embeddings=False))
    g = M.GEM(cfg).eval()
    g.save_pretrained(tmp_path / "ck", extra_tensors={"head.w": torch.ones(3)})
    g2, extra = M.GEM.from_pretrained(str(tmp_path / "ck"), return_extra=True)
    ids, px = _ids(cfg), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(g(ids, px)["logits"], g2.eval()(ids, px)["logits"])
    assert list(extra) == ["head.w"]
    tensors, _, _ = M.load_checkpoint(str(tmp_path / "ck"))
    assert not any(k.startswith(("module.", "_orig_mod.")) or "._orig_mod." in k for k in tensors)
    # a checkpoint of another config: the error names the tensor and both shapes
    other = M.GEM(M.GEMConfig(**dict(MICRO, dim=48, tie_embeddings=False)))
    with pytest.raises(ValueError, match=r"x\.safetensors: tensor '[a-z0-9_.]+' has shape \(.*\) but this config expects"):
        M.load_tensors(g, other.state_dict(), "x.safetensors")


# ---------------------------------------------------------------- loss

def test_text_loss_ignores_masked_labels():
    torch.manual_seed(0)
    cfg = M.GEMConfig(**MICRO)
    g = M.GEM(cfg)
    ids, px = _ids(cfg), torch.randn(2, 3, 32, 32)
    labels = torch.full_like(ids, -100)
    labels[:, 8:] = ids[:, 8:]  # "assistant" tokens only
    out = g(ids, px, labels=labels)
    logp = out["logits"][:, :-1].log_softmax(-1)
    ref = -logp.gather(-1, ids[:, 1:, None])[..., 0][:, 7:].mean()  # positions 7.. predict tokens 8..
    assert torch.allclose(out["loss"], ref, atol=1e-5)
    # all -100 gives 0, not nan
    assert g(ids, px, labels=torch.full_like(ids, -100))["loss"].item() == 0.0


def test_tiny_gem_overfits_through_the_image():
    """Four samples with the SAME text and different images and answers: only the image can tell them
    apart, so a model that ignores the pixels is stuck at log(4) on the answer token."""
    torch.manual_seed(0)
    cfg = M.GEMConfig(**MICRO)
    g = M.GEM(cfg)
    ids = _ids(cfg, B=1, T=16).expand(4, 16).clone()
    ids[:, 10] = torch.tensor([10, 11, 12, 13])  # the answer depends on the image alone
    px = torch.randn(4, 3, 32, 32)
    labels = torch.full_like(ids, -100)
    labels[:, 10:] = ids[:, 10:]
    opt = torch.optim.AdamW(g.parameters(), lr=3e-3)
    for _ in range(150):
        loss = g(ids, px, labels=labels)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def test_image_hidden_is_the_last_layer_at_the_image_tokens_in_patch_order():
    """Reference: the merged visual tokens written by hand at the image-pad positions (token j of the
    merged grid at the j-th pad), then the LLM's final-normed last layer read back at those positions."""
    torch.manual_seed(0)
    cfg = M.GEMConfig(**MICRO)
    g = M.GEM(cfg).eval()
    ids, px = _ids(cfg, start=3), torch.randn(2, 3, 32, 32)
    out = g(ids, px, output_hidden_states=True)
    vis = g.merger(g.vit.features(px))  # (B, N, D), row-major over the merged grid
    x = g.llm.embed(ids).clone()
    pos = torch.arange(3, 3 + cfg.n_image_tokens)
    x[:, pos] = vis
    h, hidden = g.llm(inputs_embeds=x, output_hidden_states=True)
    assert torch.allclose(out["image_hidden"], h[:, pos], atol=1e-6)
    assert torch.allclose(out["image_hidden"], out["hidden_states"][-1][:, pos], atol=1e-6)
    assert not torch.allclose(out["image_hidden"], hidden[-2][:, pos], atol=1e-3)  # not an earlier layer
    assert not torch.allclose(out["image_hidden"], out["image_hidden"].flip(1), atol=1e-3)  # order matters here
