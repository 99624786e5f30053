"""The medium tier's snapshots: how each is computed, by `python teach.py snapshot` from the reference
(teach/snapshots/NAME.safetensors) and by the grading tests from the student's tree, with the stored parameters and
inputs. A snapshot holds the module's parameters (randomised: norm weights away from 1, zero-initialised
gates opened), the inputs, the forward outputs and the gradients of a fixed random projection of them."""
import os

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
STORE = os.path.join(HERE, "..", "..", "teach", "snapshots")


def randomise(module, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in module.named_parameters():
            base = 1.0 if ("norm" in n and n.endswith("weight")) else 0.0
            p.copy_(base + 0.3 * torch.randn(p.shape, generator=g))


def _grads(module, named):
    out = {f"grad.{n}": (p.grad if p.grad is not None else torch.zeros_like(p)).clone() for n, p in module.named_parameters()}
    out.update({f"grad.{k}": v.grad.clone() for k, v in named.items()})
    return out


def vit_block(state=None, inputs=None):
    import model as M
    blk = M.ViTBlock(M.GEMConfig(vit_dim=32, vit_heads=2, vit_mlp=64))
    if state is None:
        randomise(blk, 0)
        g = torch.Generator().manual_seed(1)
        inputs = dict(x=torch.randn(2, 9, 32, generator=g), w=torch.randn(2, 9, 32, generator=g))
    else:
        blk.load_state_dict(state)
    x = inputs["x"].clone().requires_grad_(True)
    out = blk(x)
    (out * inputs["w"]).sum().backward()
    return dict(state={k: v.clone() for k, v in blk.state_dict().items()}, inputs=inputs, out=out.detach(),
                **_grads(blk, dict(x=x)))


LLM = dict(vocab_size=40, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=48, rope_theta=1e4,
           tie_embeddings=True)


def llm_block(state=None, inputs=None):
    """A 2-layer LanguageModel: full forward, a left-padded forward, and cached decoding (prefill 5 + 2 x 1)."""
    import model as M
    c = M.GEMConfig(**LLM)
    lm = M.LanguageModel(c)
    if state is None:
        randomise(lm, 0)
        g = torch.Generator().manual_seed(1)
        mask = torch.ones(2, 7, dtype=torch.bool)
        mask[1, :2] = False
        inputs = dict(ids=torch.randint(0, 40, (2, 7), generator=g), mask=mask, w=torch.randn(2, 7, 32, generator=g))
    else:
        lm.load_state_dict(state)
    ids, mask, w = inputs["ids"], inputs["mask"], inputs["w"]
    full, _ = lm(ids)
    padded, _ = lm(ids, attention_mask=mask)
    padded = padded * mask[..., None]  # pad positions carry no meaning
    (full * w).sum().add((padded * w).sum()).backward()
    with torch.no_grad():
        cache = M.KVCache(c, 2, 7, "cpu", torch.float32)
        steps = [lm(ids[:, :5], cache=cache)[0], lm(ids[:, 5:6], cache=cache)[0], lm(ids[:, 6:7], cache=cache)[0]]
    return dict(state={k: v.clone() for k, v in lm.state_dict().items()}, inputs=inputs, full=full.detach(),
                padded=padded.detach(), cached=torch.cat(steps, 1), **_grads(lm, {}))


def cross_attention(state=None, inputs=None):
    """A 2-block ActionExpert on 3 VLM hidden states (block i must read layer i), the second sample padded."""
    import train_vla as V
    ex = V.ActionExpert(n_blocks=2, dim=16, heads=2, ctx_dim=24, horizon=4, action_dim=7, state_dim=8, mlp_ratio=2.0)
    if state is None:
        randomise(ex, 0)
        g = torch.Generator().manual_seed(1)
        mask = torch.ones(2, 6, dtype=torch.bool)
        mask[1, 4:] = False
        inputs = dict(hidden=torch.randn(3, 2, 6, 24, generator=g), mask=mask, x_t=torch.randn(2, 4, 7, generator=g),
                      t=torch.rand(2, generator=g), state=torch.randn(2, 8, generator=g), w=torch.randn(2, 4, 7, generator=g))
    else:
        ex.load_state_dict(state)
    hidden = inputs["hidden"].clone().requires_grad_(True)
    out = ex(inputs["x_t"], inputs["t"], inputs["state"], ex.context(list(hidden), inputs["mask"]))
    (out * inputs["w"]).sum().backward()
    return dict(state={k: v.clone() for k, v in ex.state_dict().items()}, inputs=inputs, out=out.detach(),
                **_grads(ex, dict(hidden=hidden)))


COMPUTE = dict(vit_block=vit_block, llm_block=llm_block, cross_attention=cross_attention)


def save(name: str, path: str):
    """safetensors (no pickles): the nested state / inputs dicts flattened to "state/<key>", "inputs/<key>"."""
    from safetensors.torch import save_file
    flat = {}
    for k, v in COMPUTE[name]().items():
        for kk, vv in (v.items() if isinstance(v, dict) else [(None, v)]):
            flat[k if kk is None else f"{k}/{kk}"] = vv.detach().contiguous()
    save_file(flat, path)


def load(name: str) -> dict:
    from safetensors.torch import load_file
    path = os.path.join(STORE, f"{name}.safetensors")
    if not os.path.isfile(path):
        raise AssertionError(f"{path}: missing; the teacher runs `python teach.py snapshot`")
    out = {}
    for k, v in load_file(path).items():
        top, _, sub = k.partition("/")
        if sub:
            out.setdefault(top, {})[sub] = v
        else:
            out[k] = v
    return out


def compare(name: str, got: dict, want: dict, keys=None, hint: str = ""):
    """Every output and gradient within 1e-4 of the snapshot, relative to the tensor's largest entry."""
    bad = []
    for k in keys or [k for k in want if k not in ("state", "inputs")]:
        a, b = got[k], want[k]
        if a.shape != b.shape:
            bad.append(f"{k}: shape {tuple(a.shape)}, snapshot {tuple(b.shape)}")
            continue
        err = (a - b).abs().max().item() / max(b.abs().max().item(), 1e-6)
        if not err < 1e-4:
            bad.append(f"{k}: relative error {err:.2g}")
    if bad:
        raise AssertionError(f"{name}: differs from the reference snapshot: {'; '.join(bad[:4])}"
                             + (f" (+{len(bad) - 4} more)" if len(bad) > 4 else "") + (f". Usual mistakes: {hint}" if hint else ""))
