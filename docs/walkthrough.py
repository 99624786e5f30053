"""The walkthrough's commands (docs/walkthrough.md): one section per GEM idea, each prints a few deterministic
numbers computed by the project's own code at `micro` size and writes one figure into --out.

    python docs/walkthrough.py SECTION --out=DIR      SECTION: target, vlm, head, stages, vla, eval

tests/test_walkthrough.py runs every command of docs/walkthrough.md and compares what it prints, line by
line, with the text there (numbers within the stated tolerance), so the walkthrough cannot rot.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


def _save(path, panels):
    """Side-by-side panels, each (H, W, 3) uint8 or (H, W) in [0, 1], upscaled x4 (nearest)."""
    rows = [(np.repeat(p[..., None], 3, 2) * 255).astype(np.uint8) if p.ndim == 2 else p for p in panels]
    img = Image.fromarray(np.concatenate(rows, 1))
    img.resize((img.width * 4, img.height * 4), Image.NEAREST).save(path)
    print(f"figure: {os.path.basename(path)} ({len(panels)} panels)")


def _scene(size=64):
    import sim_env
    env = sim_env.TabletopEnv("goal", 3, size)
    obs, _ = env.reset(options={"start_id": 0})
    return obs


def target(out):
    """GEM's target: 1 - normalised inverse depth (data.depth_target)."""
    import data as D
    obs = _scene()
    d = obs["depth"]
    t = D.depth_target(d, 32)[0].numpy()
    print(f"depth: {d.shape[0]}x{d.shape[1]} metres, min {d.min():.3f} median {np.median(d):.3f} max {d.max():.3f}")
    print(f"target: 32x32 in [{t.min():.2f}, {t.max():.2f}], mean {t.mean():.3f}, share below 0.5: {(t < 0.5).mean():.3f}")
    near = np.unravel_index(d.argmin(), d.shape)
    print(f"nearest pixel {tuple(int(i) for i in near)} -> target {D.depth_target(d, 64)[0].numpy()[near]:.2f} (near = 0)")
    big = np.kron(t, np.ones((2, 2)))
    _save(os.path.join(out, "target.png"), [obs["rgb"], (d - d.min()) / (d.max() - d.min()), big])


def _gem():
    import model as M
    torch.manual_seed(0)
    return M.GEM(M.GEMConfig(**M.MODEL_PRESETS["micro"], vocab_size=64))


def vlm(out):
    """ViT -> 2x2 merger -> LLM; the image tokens' last-layer states are the depth head's condition."""
    gem = _gem()
    c = gem.cfg
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    print(f"params: ViT {n(gem.vit)}, merger {n(gem.merger)}, LLM {n(gem.llm)}")
    side = c.image_size // c.patch_size
    print(f"{c.image_size}px image, patch {c.patch_size}: {side}x{side} = {side * side} patches -> "
          f"{c.grid}x{c.grid} = {c.n_image_tokens} image tokens")
    ids = torch.randint(6, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    ids[:, 1:1 + c.n_image_tokens] = c.image_pad_id
    px = torch.rand(2, 3, c.image_size, c.image_size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        o = gem(ids, px, output_hidden_states=True)
    print(f"logits {tuple(o['logits'].shape)}, image_hidden {tuple(o['image_hidden'].shape)}, "
          f"hidden_states: {len(o['hidden_states'])} (embeddings + {c.n_layers} layers)")
    feats = o["image_hidden"][0].norm(dim=-1).view(c.grid, c.grid).numpy()
    _save(os.path.join(out, "vlm.png"), [((px[0].permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8),
                                         np.kron((feats - feats.min()) / (np.ptp(feats) + 1e-9), np.ones((16, 16)))])


def head(out):
    """Connector + generator trained by rectified flow on one depth target; sampled with CFG."""
    import data as D
    import depth_head as DH
    torch.manual_seed(0)
    h = DH.GenerativeHead(DH.DepthHeadConfig(llm_dim=32, cond_dim=32, width=16, grid=2, out_size=16))
    tgt = D.depth_target(_scene()["depth"], 16)[None]  # (1, 1, 16, 16)
    cond = torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(1))
    x0, eps = tgt * 2 - 1, torch.randn(tgt.shape, generator=torch.Generator().manual_seed(2))
    xt, v = DH.flow_pair(x0, eps, torch.tensor([0.3]))
    print(f"flow_pair at t=0.3: |x_t - (0.7 x0 + 0.3 eps)| = {(xt - 0.7 * x0 - 0.3 * eps).abs().max():.1e}, "
          f"target = eps - x0: {torch.allclose(v, eps - x0)}")
    opt = torch.optim.Adam(h.parameters(), lr=3e-3)
    losses = []
    for step in range(60):
        loss = h.loss(cond, tgt, seeds=[1000 + step])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"L_flow: step 0 {losses[0]:.3f}, mean of steps 50-59 {np.mean(losses[-10:]):.3f}")
    h.eval()
    s = h.sample(cond, steps=30, cfg_scale=5.0, generator=torch.Generator().manual_seed(3))
    print(f"sample (30 Euler steps, CFG 5): mean abs error vs target {(s - tgt).abs().mean():.3f}")
    _save(os.path.join(out, "head.png"), [tgt[0, 0].numpy(), s[0, 0].numpy()])


def stages(out):
    """Progressive training: what each stage trains (train_pretrain.STAGES, trainable)."""
    import depth_head as DH
    import train_pretrain as TP
    gem = _gem()
    h = DH.GenerativeHead(DH.DepthHeadConfig(llm_dim=32, cond_dim=16, width=16, grid=2, out_size=16))
    counts = []
    for stage, trained in ((0, True), (1, True), (1, False), (2, True), (3, True)):
        n = sum(p.numel() for p in TP.trainable(gem, h if stage else None, stage, trained, lambda m: None))
        counts.append(n)
        print(f"stage {stage}{' (untrained head)' if not trained else ''}: trains {', '.join(TP.STAGES[stage]['trains'])}"
              f"{' + generator' if stage == 1 and not trained else ''}; {n} parameters; losses {'+'.join(TP.STAGES[stage]['losses'])}")
    print(f"gem_loss(stage 3, text 2.0, flow 0.5, lam 0.1) = {TP.gem_loss(3, 2.0, 0.5, 0.1):.2f}")
    bars = np.zeros((20, 5 * 8))
    for i, n in enumerate(counts):
        bars[20 - int(20 * n / max(counts)):, i * 8:i * 8 + 6] = 1.0
    _save(os.path.join(out, "stages.png"), [bars])


def vla(out):
    """GEM-VLA: block i of the action expert cross-attends to VLM layer i; flow matching on the action chunk."""
    import train_vla as V
    gem = _gem()
    torch.manual_seed(0)
    ex = V.ActionExpert(n_blocks=gem.cfg.n_layers + 1, dim=32, heads=2, ctx_dim=gem.cfg.dim, horizon=4)
    ids = torch.randint(6, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hs = gem(ids, output_hidden_states=True)["hidden_states"]
    ctx = ex.context(hs, torch.ones(2, 6, dtype=torch.bool))
    print(f"VLM hidden states: {len(hs)} x {tuple(hs[0].shape)}; expert blocks: {len(ctx)}, block i <- layer i")
    a, st = torch.randn(2, 4, 7, generator=torch.Generator().manual_seed(1)), torch.zeros(2, 8)
    loss = V.flow_matching_loss(ex, ctx, a, st, torch.ones(2, 4, dtype=torch.bool), generator=torch.Generator().manual_seed(2))
    print(f"flow-matching loss at init (zero velocity: E|eps - a|^2 ~ 2): {loss.item():.3f}")
    act = ex.sample(st, ctx, steps=5, generator=torch.Generator().manual_seed(3))
    print(f"sampled chunk {tuple(act.shape)} after 5 Euler steps; at init it is the noise itself: "
          f"{torch.allclose(act, torch.randn(2, 4, 7, generator=torch.Generator().manual_seed(3)))}")
    _save(os.path.join(out, "vla.png"), [((act[0].numpy() + 3) / 6).clip(0, 1).repeat(4, 0).repeat(4, 1)])


def eval_(out):
    """The scores: Wilson intervals for rates, VSI-Bench MRA for numbers, IoU for boxes."""
    import eval as E
    lo, hi = E.wilson(7, 10)
    print(f"7/10 successes: 95% Wilson interval [{lo:.3f}, {hi:.3f}]; 0/10: [{E.wilson(0, 10)[0]:.3f}, {E.wilson(0, 10)[1]:.3f}]")
    print(f"MRA: pred 12 for 10 -> {E.mean_relative_accuracy(12.0, 10.0):.1f}, pred 10.3 -> "
          f"{E.mean_relative_accuracy(10.3, 10.0):.1f}, pred 25 -> {E.mean_relative_accuracy(25.0, 10.0):.1f}")
    print(f"IoU [0,0,100,100] vs [50,0,150,100]: {E.box_iou([0, 0, 100, 100], [50, 0, 150, 100]):.3f}")
    ks = np.arange(0, 11)
    iv = np.array([E.wilson(k, 10) for k in ks])
    img = np.zeros((50, 11 * 4))
    for k, (a, b) in enumerate(iv):
        img[50 - int(b * 50):50 - int(a * 50) or None, k * 4:k * 4 + 3] = 1.0
    _save(os.path.join(out, "eval.png"), [img])


SECTIONS = dict(target=target, vlm=vlm, head=head, stages=stages, vla=vla, eval=eval_)


def main(argv):
    out = next((a.split("=", 1)[1] for a in argv if a.startswith("--out=")), "out/walkthrough")
    names = [a for a in argv if not a.startswith("--")]
    if len(names) != 1 or names[0] not in SECTIONS:
        raise SystemExit(f"usage: python docs/walkthrough.py SECTION --out=DIR (SECTION: {', '.join(SECTIONS)})")
    torch.set_num_threads(1)
    os.makedirs(out, exist_ok=True)
    SECTIONS[names[0]](out)


if __name__ == "__main__":
    main(sys.argv[1:])
