"""train_vla.py on the micro preset: the action expert can fit demo chunks, Policy preprocessing == training
preprocessing, normalisation round trips, the depth term exists only when weighted, exact resume, NaN guard,
and a briefly trained policy drives the simulator closed-loop (with its action queue re-planning every k)."""
import json
import os

import numpy as np
import pytest
import torch

import data as D
import train_pretrain as TP
import train_vla as V
from common import parse_config


@pytest.fixture(scope="module")
def init(tmp_path_factory, micro_data):
    """A micro pretraining checkpoint (untrained VLM + depth head) in train_pretrain's own format."""
    out = str(tmp_path_factory.mktemp("vla_init") / "gem")
    tok_path = os.path.join(micro_data, "tokenizer.json")
    tc = parse_config(TP.TrainConfig, ["--preset=micro"], TP.PRESETS)
    torch.manual_seed(0)
    gem = TP.build_gem(tc, D.load_tokenizer(tok_path))
    head = TP.build_head(tc, gem, "gem")
    TP.save_stage(out, gem, head, tc, tok_path, 3, 0, torch.optim.AdamW(gem.parameters()), True, 0)
    return out


def train(init, demos, out, *args):
    return V.main([f"--init={init}", f"--demos={demos}", f"--out={out}", "--preset=micro", *map(str, args)])


def records(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_expert_overfits_demo_chunks(init, micro_demos):
    """A few demo chunks, VLM features fixed: flow matching + 5 Euler steps must reproduce the actions."""
    vlm, _, tok, tc = TP.load_pretrained(init)
    ds = D.DemoDataset(micro_demos, tok, vlm.cfg.image_size, 4, 16, vlm.cfg.n_image_tokens, image_first=tc.image_first)
    b = D.collate([ds[i] for i in (0, 5, len(ds) // 2, len(ds) - 3)], D.special_ids(tok)["pad_id"])
    with torch.no_grad():
        hs = vlm(b["input_ids"], b["pixel_values"], attention_mask=b["attention_mask"], output_hidden_states=True)["hidden_states"]
    torch.manual_seed(0)
    expert = V.ActionExpert(3, 64, 4, vlm.cfg.dim, horizon=4)
    opt = torch.optim.AdamW(expert.parameters(), lr=2e-3)
    for _ in range(300):
        loss = V.flow_matching_loss(expert, expert.context(hs, b["attention_mask"]), b["actions"], b["state"],
                                    b["action_mask"], repeats=8)
        opt.zero_grad()
        loss.backward()
        opt.step()
    pred = expert.sample(b["state"], expert.context(hs, b["attention_mask"]), steps=5)
    m = b["action_mask"][..., None].float()
    l1 = ((pred - b["actions"]).abs() * m).sum() / (m.sum() * 7)
    base = ((b["actions"] - 0).abs() * m).sum() / (m.sum() * 7)  # predicting the mean action
    assert l1 < 0.1 and l1 < 0.2 * base, (float(l1), float(base))


def test_normalisation_round_trips(micro_demos):
    eps = [D.load_episode(p) for p in D.episode_files(micro_demos)]
    stats = D.compute_norm_stats(micro_demos)
    acts = np.concatenate([e["actions"] for e in eps])
    for key, x in (("action", acts), ("state", np.concatenate([e["states"] for e in eps]))):
        z = D.normalize(x, stats, key)
        assert torch.allclose(D.unnormalize(z, stats, key), torch.as_tensor(x, dtype=torch.float32), atol=1e-5)
        varying = x.std(0) > 1e-6  # independent reference: numpy moments of the raw demo values
        assert np.allclose(z.numpy().mean(0), 0, atol=1e-4)
        assert np.allclose(z.numpy()[:, varying].std(0), 1, atol=1e-3)


def test_policy_preprocessing_equals_training(init, micro_demos, tmp_path):
    out = str(tmp_path / "vla")
    train(init, micro_demos, out, "--steps=1")
    pol = V.Policy(os.path.join(out, "ckpt"))
    # the checkpoint carries the statistics of the TRAINING episodes: each task's last episode is held out.
    # Reference: numpy moments of the raw .npz files, grouped by task in file order.
    by_task = {}
    for f in D.episode_files(micro_demos):
        z = np.load(f)
        by_task.setdefault((str(z["suite"]), int(z["task_id"])), []).append(z["actions"])
    train_acts = np.concatenate([a for eps in by_task.values() for a in eps[:-1]])
    all_acts = np.concatenate([a for eps in by_task.values() for a in eps])
    assert pol.stats["action"]["mean"] == pytest.approx(train_acts.mean(0).tolist(), abs=1e-6)
    assert not np.allclose(pol.stats["action"]["mean"], all_acts.mean(0), atol=1e-4)
    ds = D.DemoDataset(micro_demos, pol.tok, 64, 4, 16, pol.model.vlm.cfg.n_image_tokens,
                       image_first=pol.pre_tc.image_first, stats=pol.stats, cache=False)
    from sim_env import TabletopEnv
    for i in (0, 7, len(ds) - 1):
        e, t = ds.index[i]
        ep = ds.eps[e]
        env = TabletopEnv(ep["suite"], ep["task_id"])
        env.set_state(ep["sim_states"][t])
        obs = env.render()  # what the simulator gives the policy at that moment of the demo
        obs["instruction"] = ep["instruction"]
        got, want = pol.preprocess(obs), ds[i]
        for k in ("input_ids", "image", "state"):
            assert torch.equal(got[k], want[k]), k
        assert np.allclose(obs["state"], ep["states"][t])


def test_depth_term_only_when_weighted(init, micro_demos, tmp_path):
    for w in (0.1, 0.0):
        out = str(tmp_path / f"w{w}")
        model = train(init, micro_demos, out, "--steps=2", f"--depth_weight={w}")
        recs = [r for r in records(out) if "action" in r]
        keys = json.load(open(os.path.join(out, "ckpt", "pretrain.json")))
        assert (model.head is not None) == bool(w) and (keys["head"] is not None) == bool(w)
        assert all(("depth" in r) == bool(w) for r in recs) and recs
        tensors = V.load_checkpoint(os.path.join(out, "ckpt"))[0]
        assert any(k.startswith("head.") for k in tensors) == bool(w)
        assert any(k.startswith("expert.") for k in tensors)


def _micro_vla(init, micro_demos):
    vlm, head, tok, tc = TP.load_pretrained(init)
    cfg = parse_config(V.VLAConfig, ["--preset=micro"], V.PRESETS)
    ds = D.DemoDataset(micro_demos, tok, vlm.cfg.image_size, cfg.horizon, head.cfg.out_size, vlm.cfg.n_image_tokens,
                       image_first=tc.image_first)
    return V.GEMVLA(vlm, V.build_expert(cfg, vlm.cfg), head), cfg, ds, D.special_ids(tok)["pad_id"]


def test_depth_loss_sends_gradients_into_the_vlm(init, micro_demos):
    """The paper keeps L_flow (x0.1) on during VLA training so that depth keeps shaping the VLM: the depth
    term alone must reach the ViT and the LLM (and not the action expert)."""
    torch.manual_seed(0)
    model, cfg, ds, pad = _micro_vla(init, micro_demos)
    terms = model(D.collate([ds[i] for i in range(4)], pad), cfg)
    terms["depth"].backward()
    for name, mod in (("vit", model.vlm.vit), ("llm", model.vlm.llm.layers[-1])):
        assert any(p.grad is not None and p.grad.abs().max() > 0 for p in mod.parameters()), name
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in model.expert.parameters())


def test_block_j_reads_only_layer_j_and_padding_changes_nothing(init, micro_demos):
    torch.manual_seed(0)
    model, cfg, ds, pad = _micro_vla(init, micro_demos)
    model.eval()
    for p in model.expert.parameters():  # AdaLN-Zero starts every block as the identity: give it real weights
        torch.nn.init.normal_(p, std=0.2)
    items = [ds[0], ds[len(ds) - 1]]
    b = D.collate(items, pad)
    with torch.no_grad():
        hs = model.vlm(b["input_ids"], b["pixel_values"], attention_mask=b["attention_mask"],
                       output_hidden_states=True)["hidden_states"]
        ctx = model.expert.context(hs, b["attention_mask"])
        n = len(model.expert.blocks)
        for j in range(n):  # perturb VLM layer j: only block j's cross-attention keys/values change
            hs2 = list(hs)
            hs2[j] = hs[j] + torch.randn_like(hs[j])
            ctx2 = model.expert.context(hs2, b["attention_mask"])
            assert [not torch.equal(ctx[i][0], ctx2[i][0]) for i in range(n)] == [i == j for i in range(n)], j
        # padding: the same observation alone, and right-padded to a longer batch, gets the same velocity
        x, t = torch.randn(1, cfg.horizon, 7), torch.tensor([0.4])
        alone = D.collate(items[:1], pad)
        longer = dict(items[0], input_ids=torch.cat([items[0]["input_ids"], torch.full((5,), pad)]),
                      labels=torch.cat([items[0]["labels"], torch.full((5,), -100)]))
        padded = D.collate([longer], pad)
        padded["attention_mask"][0, -5:] = False
        v = [model.expert(x, t, bb["state"], model.encode(bb["input_ids"], bb["pixel_values"], bb["attention_mask"])[1])
             for bb in (alone, padded)]
        assert torch.allclose(v[0], v[1], atol=1e-5)


def test_resume_is_exact(init, micro_demos, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train(init, micro_demos, a, "--steps=4")
    # b: loaded by worker processes, stopped and resumed: the same samples, the same weights
    train(init, micro_demos, b, "--steps=4", "--stop_after=2", "--workers=2")
    with pytest.raises(SystemExit, match="--resume"):  # an existing run is never silently overwritten
        train(init, micro_demos, b, "--steps=4")
    for changed, name in (("--horizon=8", "horizon"), ("--steps=6", "steps"), ("--lr=0.01", "lr")):  # another run
        with pytest.raises(SystemExit, match=f"--resume: --{name}="):
            train(init, micro_demos, b, "--steps=4", "--resume", changed)
    train(init, micro_demos, b, "--steps=4", "--resume", "--workers=2")
    assert len(json.load(open(os.path.join(b, "run.json")))["invocations"]) == 2  # every invocation kept
    ta, tb = (V.load_checkpoint(os.path.join(d, "ckpt"))[0] for d in (a, b))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.allclose(ta[k], tb[k], atol=1e-6), k
    la = [r["loss"] for r in records(a) if "loss" in r]
    lb = [r["loss"] for r in records(b) if "loss" in r]
    assert la == pytest.approx(lb, abs=1e-6)


def test_nan_loss_stops_with_one_line(init, micro_demos, tmp_path, monkeypatch):
    get = D.DemoDataset.__getitem__

    def bad(self, i):  # a corrupt demo step: NaN state
        item = get(self, i)
        item["state"] = item["state"] * float("nan")
        return item
    monkeypatch.setattr(D.DemoDataset, "__getitem__", bad)
    out = str(tmp_path / "nan")
    with pytest.raises(SystemExit) as e:
        train(init, micro_demos, out, "--steps=3")
    assert "non-finite loss" in str(e.value) and "\n" not in str(e.value)
    assert not os.path.exists(os.path.join(out, "ckpt"))  # nothing written from bad weights


def test_nan_gradient_with_a_finite_loss_stops(init, micro_demos, tmp_path, monkeypatch):
    """sqrt(0) has an infinite derivative: 0 * sqrt(0 * w) adds 0 to the loss and NaN to w's gradient."""
    fm = V.flow_matching_loss
    monkeypatch.setattr(V, "flow_matching_loss",
                        lambda expert, *a, **k: fm(expert, *a, **k) + 0.0 * (0.0 * expert.out.bias).sum().sqrt())
    out = str(tmp_path / "nangrad")
    with pytest.raises(SystemExit) as e:
        train(init, micro_demos, out, "--steps=3")
    assert "grad norm nan" in str(e.value) and "\n" not in str(e.value)
    assert not os.path.exists(os.path.join(out, "ckpt"))


@pytest.mark.parametrize("args,needle", [(["--nope=1"], "--nope"), (["--tasks=goal:x"], "--tasks"),
                                         (["--tasks=spatial:9"], "spatial"), (["--tasks=long"], "long"), (["--expert_blocks=9"], "--expert_blocks")])
def test_bad_flags_one_line(init, micro_demos, tmp_path, args, needle):
    with pytest.raises(SystemExit) as e:
        train(init, micro_demos, str(tmp_path / "bad"), "--steps=1", *args)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_policy_runs_closed_loop(init, micro_demos, tmp_path):
    out = str(tmp_path / "vla")
    train(init, micro_demos, out, "--steps=3", "--tasks=goal:6")
    ds = D.DemoDataset(micro_demos, V.load_pretrained(init)[2], 64, 4, 16, 4)
    tr, va = V.split_demos(ds, "goal", 1)  # a suite name = all its tasks; one episode per task held out
    assert {ds.eps[ds.index[i][0]]["task_id"] for i in tr} == {0, 6} == {ds.eps[ds.index[i][0]]["task_id"] for i in va}
    assert not {ds.index[i][0] for i in tr} & {ds.index[i][0] for i in va}
    pol = V.Policy(out, replan_k=3)  # a run directory resolves to its checkpoint
    calls = []
    predict = pol.predict
    pol.predict = lambda obs: calls.append(len(obs)) or predict(obs)
    from sim_env import TabletopEnv
    env = TabletopEnv("goal", 6)
    obs, info = env.reset(options={"start_id": 0})
    pol.reset()
    for _ in range(9):
        a = pol.act(obs)
        assert a.shape == (7,) and np.isfinite(a).all() and np.abs(a).max() <= 1
        obs, _, term, trunc, info = env.step(a)
    assert calls == [1, 1, 1]  # 9 actions, re-planned every 3
    envs = [TabletopEnv("goal", 6), TabletopEnv("goal", 0)]
    obs = [e.reset(options={"start_id": 1})[0] for e in envs]
    pol.reset(2)
    acts = pol.act_batch([obs[0], None])  # a finished environment gets no action
    assert acts[1] is None and acts[0].shape == (7,)
    acts = pol.act_batch(obs)
    assert calls[-1] == 1 and all(x.shape == (7,) for x in acts)  # only env 1 needed a new chunk


def test_freeze_vlm_really_freezes(init, micro_demos, tmp_path):
    out = str(tmp_path / "frozen")
    train(init, micro_demos, out, "--steps=2", "--freeze_vlm")
    before, after = V.load_checkpoint(init)[0], V.load_checkpoint(os.path.join(out, "ckpt"))[0]
    vlm_keys = [k for k in before if not k.startswith("head.")]
    assert vlm_keys and all(torch.equal(before[k], after[k]) for k in vlm_keys)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("head."))  # the head still learns depth


def test_closed_loop_evaluation_is_reproducible_across_workers(init, micro_demos, tmp_path):
    """The flow noise is seeded per job: one worker running both tasks in turn and two workers running
    one each give the same episodes (final robot state included), whatever the order jobs are handed out."""
    import eval as ev
    out = str(tmp_path / "vla")
    train(init, micro_demos, out, "--steps=1")
    kw = dict(suites=["goal"], episodes=2, task_ids=[0, 6])
    one, two = ev.rollouts(out, workers=1, **kw), ev.rollouts(out, workers=2, **kw)
    key = lambda r: (r["task_id"], r["start_id"])  # noqa: E731
    assert sorted(one, key=key) == sorted(two, key=key) and len(one) == 4
    assert len({tuple(r["final_state"]) for r in one}) == 4  # the episodes differ: the comparison can tell


@pytest.mark.parametrize("blocks,depth", [(2, False), (2, True), (0, False)])
def test_step_flops_match_torch_flop_counter(init, micro_demos, blocks, depth, monkeypatch):
    """The VLA's MFU counts what runs: vlm_flops with the backward only through the LLM layers the loss
    reaches (the expert's blocks read hidden states 0..blocks-1; the depth head reads the last layer), no
    unembedding backward, plus the expert's and head's layers by hooks == torch's FlopCounterMode for the same
    forward + backward. The expert's attention runs through SDPA, which torch's CPU counter does not see and
    layer_flops leaves out (< 1% of a step). A batch of one sample repeated has no padding."""
    from torch.utils.flop_counter import FlopCounterMode
    import common as C
    import model as M
    monkeypatch.setattr(M, "SDPA", False)  # the VLM's reference attention: two matmuls the counter sees
    vlm, head, tok, tc = TP.load_pretrained(init)
    cfg = parse_config(V.VLAConfig, ["--preset=micro", f"--expert_blocks={blocks}"], V.PRESETS)
    vla = V.GEMVLA(vlm, V.build_expert(cfg, vlm.cfg), head if depth else None)
    ds = D.DemoDataset(micro_demos, tok, vlm.cfg.image_size, cfg.horizon, head.cfg.out_size, vlm.cfg.n_image_tokens)
    b = D.collate([ds[3]] * 3, D.special_ids(tok)["pad_id"])
    assert vla.grad_layers() == (vlm.cfg.n_layers if depth or not blocks else blocks - 1)
    torch.manual_seed(0)
    with FlopCounterMode(display=False) as fc:
        vla(b, cfg)["loss"].backward()
    parts = torch.nn.ModuleList([m for m in (vla.expert, vla.head) if m is not None])
    counted = C.layer_flops(parts, lambda: vla(b, cfg))  # a forward only, as train_vla counts its first batch
    ours = C.vlm_flops(vlm.cfg, b["attention_mask"], True, vla.grad_layers(), text_grad=False) + counted
    assert ours == pytest.approx(fc.get_total_flops(), rel=1e-9)
