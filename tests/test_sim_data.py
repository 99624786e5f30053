"""sim_data.py: the generated micro data re-checked against the simulator by independent functions, the
split rules, balanced answers, restarts and seed ranges of the generator, and the expert demos (fixtures in
conftest.py)."""
import dataclasses
import json
import math
import os
import re

import numpy as np
import pytest
from PIL import Image

import data
import sim_data

# ----------------------------------------------------------------------------------------------------
# Generated micro data, re-checked against the simulator by independent functions

def _records(root):
    return [r for s in ("train", "val", "test") for r in data.read_jsonl(os.path.join(root, f"{s}.jsonl"))]


def _frame(root, fid, cache={}):
    """Re-create the frame from its stored simulator state: (obs, info, env)."""
    import sim_env
    with open(os.path.join(root, "states", fid + ".json")) as f:
        st = json.load(f)
    key = (st["suite"], st["task_id"])
    if key not in cache:
        cache[key] = sim_env.TabletopEnv(st["suite"], st["task_id"], image_size=64)
    env = cache[key]
    obs, info = env.reset(options={"state": st["state"]})
    return obs, info, env, st


def _to_px(c):  # 0..1000 -> pixel index at 64x64
    return min(63, int(c * 64 / 1000))


def _mask_box(seg, oid):
    ys, xs = np.nonzero(seg == oid)
    return [xs.min() * 1000 / 64, ys.min() * 1000 / 64, (xs.max() + 1) * 1000 / 64, (ys.max() + 1) * 1000 / 64]


def _world_at(info, depth, px, py):
    """Back-project pixel centre (px, py) with its metric z-depth into the world (pinhole, OpenCV axes)."""
    K, pose = np.array(info["K"]), np.array(info["cam_pose"])
    z = depth[py, px]
    pc = np.array([(px + 0.5 - K[0, 2]) / K[0, 0] * z, (py + 0.5 - K[1, 2]) / K[1, 1] * z, z])
    return pose[:3, :3] @ pc + pose[:3, 3]


def _rel_true(a, b, rel):
    """Relations written out independently of sim_env (its documented thresholds)."""
    import sim_env
    pa, pb, ha, hb = (np.array(v) for v in (a["pos"], b["pos"], a["half_extents"], b["half_extents"]))
    gap = sim_env.REL_GAP
    if rel in ("left_of", "right_of", "in_front_of", "behind"):
        d = {"left_of": pb[0] - pa[0], "right_of": pa[0] - pb[0], "in_front_of": pb[1] - pa[1], "behind": pa[1] - pb[1]}[rel]
        return d > gap
    over = np.all(np.abs(pa[:2] - pb[:2]) < hb[:2] * (1.0 if b["shape"] in ("plate", "can", "ball") else 1.5))
    if rel == "on":
        return over and abs((pa[2] - ha[2]) - (pb[2] + hb[2])) < sim_env.ON_TOL_Z
    return over and (pa[2] - ha[2]) < pb[2] + hb[2]  # inside the tray: bottom below the rim


def _objs(info):
    return {o["id"]: o for o in info["objects"]}


def check_record(root, r):
    """Independent re-check of one generated record; returns its type."""
    m = r["meta"]
    typ, ans_text = m["type"], next((t["value"] for t in r["conversations"] if t["from"] == "gpt"), None)
    obs, info, env, st = _frame(root, m["frame"])
    seg, depth, objs = obs["seg"], obs["depth"], _objs(info)
    img = np.array(Image.open(os.path.join(root, r["image"])).convert("RGB"))
    if typ != "marked":
        assert (img == obs["rgb"]).all(), r["id"]  # the stored frame is the simulator's frame
    d_png = data.load_depth_png(os.path.join(root, r["depth"]))
    assert np.abs(d_png - depth).max() <= 0.0005 + 1e-6
    ans, q = m.get("answer"), r["conversations"][0]["value"]
    for k in ("obj", "ref"):  # the 2D boxes the rule baseline sees are the objects' pixel boxes in this image
        if f"{k}_box" in m:
            assert np.abs(np.array(m[f"{k}_box"]) - _mask_box(seg, m[k])).max() <= 1.0, r["id"]
    # the objects the answer is checked against (meta) are the ones the question names, in its order
    at = [re.search(rf"\bthe {re.escape(objs[m[k]]['name'])}\b", q) for k in ("obj", "ref") if k in m and typ != "rel_mc"]
    assert all(at) and [a.start() for a in at] == sorted(a.start() for a in at), r["id"]
    if "rel" in m:
        assert f" {sim_data.RELATIONS[m['rel']]} the {objs[m['ref']]['name']}" in q, r["id"]
    if typ == "box":
        assert ans_text == "[{}, {}, {}, {}]".format(*ans)
        assert np.abs(np.array(ans) - _mask_box(seg, m["obj"])).max() <= 1.0
    elif typ in ("point", "grasp"):
        assert ans_text == "({}, {})".format(*ans)
        assert seg[_to_px(ans[1]), _to_px(ans[0])] == m["obj"]
        assert objs[m["obj"]]["name"] in r["conversations"][0]["value"]
    elif typ == "place":
        px, py = _to_px(ans[0]), _to_px(ans[1])
        assert seg[py, px] == 0  # nothing there
        p = _world_at(info, depth, px, py)
        assert abs(p[2]) < 0.005  # on the table top
        a, b = objs[m["obj"]], objs[m["ref"]]
        moved = dict(a, pos=[p[0], p[1], a["half_extents"][2]])
        assert _rel_true(moved, b, m["rel"])
        ra = max(a["half_extents"][:2])
        for o in info["objects"]:  # free: a's footprint at p overlaps no other object's footprint
            if o["id"] != a["id"]:
                assert (abs(p[0] - o["pos"][0]) > o["half_extents"][0] + ra - 0.003
                        or abs(p[1] - o["pos"][1]) > o["half_extents"][1] + ra - 0.003), (r["id"], o["name"])
    elif typ == "list":
        assert sorted(it["obj"] for it in ans) == sorted(objs)  # every object, once
        centres = [(it["box"][0] + it["box"][2]) for it in ans]
        assert centres == sorted(centres)
        for it in ans:
            assert np.abs(np.array(it["box"]) - _mask_box(seg, it["obj"])).max() <= 1.0
            assert f"{it['name']} [" in ans_text
    elif typ == "rel_yn":
        assert ans_text in ("yes", "no")
        assert _rel_true(objs[m["obj"]], objs[m["ref"]], m["rel"]) == (ans_text == "yes"), r["id"]
    elif typ == "rel_mc":
        names = {o["name"]: o for o in info["objects"]}
        k = "ABCD".index(ans_text)
        for i, n in enumerate(m["choices"]):
            assert _rel_true(names[n], objs[m["ref"]], m["rel"]) == (i == k), (r["id"], n)
            assert f"{'ABCD'[i]}. {n}" in r["conversations"][0]["value"]
    elif typ == "closer":
        da, db = (np.median(depth[seg == m[k]]) for k in ("obj", "ref"))
        assert (da < db) == (ans_text == "yes")
    elif typ == "marked":
        (xa, ya), (xb, yb) = m["points_px"]
        assert img[ya, xa].tolist() == [0, 255, 255] and img[yb, xb].tolist() == [255, 0, 255]  # A cyan, B magenta
        assert (depth[ya, xa] < depth[yb, xb]) == (ans_text == "A")
    elif typ == "distance":
        a, b = objs[m["obj"]], objs[m["ref"]]
        assert abs(int(ans_text) - 100 * math.dist(a["pos"][:2], b["pos"][:2])) <= 0.5 + 1e-9
    elif typ == "height":
        assert abs(int(ans_text) - 200 * objs[m["obj"]]["half_extents"][2]) <= 0.5 + 1e-9
    elif typ == "count":
        what = m["what"]
        n = sum(1 for o in info["objects"] if what == "objects" or what == f"{o['colour']} objects"
                or what in (o["shape"] + "s", o["shape"] + "es"))
        assert int(ans_text) == n
    elif typ == "fit":
        a, b = objs[m["obj"]], objs[m["ref"]]
        area = lambda o: o["half_extents"][0] * o["half_extents"][1]
        assert (area(a) < area(b)) == (ans_text == "yes")
    elif typ == "decompose":
        assert ans_text.split("; ") == list(env.task.subgoals)
    elif typ == "next_step":
        assert m["choices"]["ABCD".index(ans_text)] == env.task.subgoals[env.expert_subgoal]
    elif typ == "done":
        assert info["success"] == (ans_text == "yes")
    elif typ == "trajectory":
        import sim_env
        sim = sim_env.TabletopEnv(st["suite"], st["task_id"], image_size=64, render_images=False)
        sim.reset(options={"state": st["state"]})
        path = [sim.get_state()["grip"][:3]]
        for _ in range(300):
            _, _, term, trunc, inf = sim.step(sim.expert_action())
            path.append(sim.get_state()["grip"][:3])
            if term or trunc:
                break
        idx = np.round(np.linspace(0, len(path) - 1, m["n"])).astype(int)
        uv = sim_env.project(info["K"], info["cam_pose"], np.array(path)[idx]) * 1000 / 64
        assert (uv >= 0).all() and (uv < 1000).all()  # a path that leaves the view is not asked about
        assert len(ans) == m["n"] and np.abs(np.array(ans) - uv).max() <= 1.0
    elif typ == "caption":
        vis = {o["name"] for o in info["objects"] if (seg == o["id"]).sum() >= sim_data.MIN_VISIBLE * 64 * 64}
        assert set(ans_text.split(", ")) == vis
    elif typ == "depth":
        assert [t["from"] for t in r["conversations"]] == ["human"]
    else:
        raise AssertionError(f"unchecked type {typ}")
    return typ


def test_every_generated_answer_rechecked_against_the_simulator(micro_data):
    recs = _records(micro_data)
    seen = {check_record(micro_data, r) for r in recs}
    assert seen == set(sim_data.TYPE_FAMILY) | {"depth"}  # the micro preset covers every type
    stats = json.load(open(os.path.join(micro_data, "stats.json")))
    assert sum(s["samples"] for s in stats["splits"].values()) == len(recs)


def test_every_vlm_image_has_its_own_camera_and_objects_their_own_sizes(micro_data):
    """The camera of each frame, re-derived from its stored state (position, look-at, fov), lies in the
    documented VIEW ranges; the cameras differ; movable objects are scaled within SCALE (cubes and balls
    uniformly), and the same shape comes in several heights; plates and trays in their footprint only."""
    import sim_env
    views, heights = set(), {}
    for f in sorted(os.listdir(os.path.join(micro_data, "states"))):
        st = json.load(open(os.path.join(micro_data, "states", f)))["state"]
        cam, look, fov = np.array(st["aug"]["cam"]), np.array(st["aug"]["look"]), st["aug"]["fov"]
        v = cam - look
        dist, pitch = np.linalg.norm(v), math.degrees(math.asin(v[2] / np.linalg.norm(v)))
        yaw = math.degrees(math.atan2(v[0], -v[1]))
        for name, x in (("dist", dist), ("pitch", pitch), ("yaw", yaw), ("fov", fov), ("look_x", look[0]), ("look_y", look[1])):
            lo, hi = sim_data.VIEW[name]
            assert lo - 1e-6 <= x <= hi + 1e-6, (f, name, x)
        assert look[2] == 0.0
        views.add(round(float(cam[0]), 4))
        obs, info, _, _ = _frame(micro_data, f[:-5])
        assert np.isclose(info["K"][0][0], 32 / math.tan(math.radians(fov) / 2))  # the rendered camera is this one
        for o in st["objects"]:
            if o["shape"] in sim_env.SHAPES:
                r = np.array(o["half_extents"]) / np.array(sim_env.HALF[o["shape"]])
                if o["shape"] in ("cube", "ball"):
                    assert np.allclose(r, r[0]) and sim_data.SCALE["uniform"][0] <= r[0] <= sim_data.SCALE["uniform"][1]
                else:
                    assert np.isclose(r[0], r[1]) and sim_data.SCALE["xy"][0] <= r[0] <= sim_data.SCALE["xy"][1]
                    assert sim_data.SCALE["z"][0] <= r[2] <= sim_data.SCALE["z"][1]
                heights.setdefault(o["shape"], set()).add(round(o["half_extents"][2], 5))
            else:  # plates and trays: a footprint scale, their height as built
                r = np.array(o["half_extents"]) / np.array(sim_env.HALF[o["shape"]])
                assert np.isclose(r[0], r[1]) and np.isclose(r[2], 1.0)
                assert sim_data.SCALE["receptacle"][0] <= r[0] <= sim_data.SCALE["receptacle"][1]
    assert len(views) > 5
    assert any(len(h) > 2 for h in heights.values())


def test_split_rules_heldout_templates_and_combos(micro_data):
    for s in ("train", "val"):
        for r in data.read_jsonl(os.path.join(micro_data, f"{s}.jsonl")):
            q = r["conversations"][0]["value"]
            assert not any(f"{c} {sh}" in q + r["conversations"][-1]["value"] for c, sh in sim_data.HELDOUT_COMBOS)
            assert not r["meta"].get("heldout_template")
            held = [t for typ, (_, ht) in sim_data.TEMPLATES.items() for t in ht if t]
            assert all(q.split("\n", 1)[-1] != h for h in held)
    test = data.read_jsonl(os.path.join(micro_data, "test.jsonl"))
    assert any(r["meta"].get("heldout_template") for r in test)
    # the extra reasoning-only rollouts: reasoning questions only, each type at most once per frame, in
    # distribution (training templates, no held-out colour x shape in the scene), reasoning_frames frames each
    cfg = sim_data.GEN_PRESETS["micro"]
    extra = [r for r in test if int(r["meta"]["frame"].split("-")[1]) >= cfg["test_rollouts"]]
    frames = {}
    for r in extra:
        assert r["task"] == "reasoning" and not r["meta"]["heldout_template"], r["id"]
        frames.setdefault(r["meta"]["frame"], []).append(r["meta"]["type"])
        objs = json.load(open(os.path.join(micro_data, "states", r["meta"]["frame"] + ".json")))["state"]["objects"]
        assert not {(o["colour"], o["shape"]) for o in objs} & sim_data.HELDOUT_COMBOS
    assert len(frames) == cfg["test_reasoning_rollouts"] * cfg["reasoning_frames"]
    assert all(len(ts) == len(set(ts)) >= 4 for ts in frames.values()), frames
    # train's extra rollouts: the same reasoning questions, plus a caption and grounding questions per frame
    # (stage 0 learns to see on them too)
    train = [r for r in data.read_jsonl(os.path.join(micro_data, "train.jsonl"))
             if int(r["meta"]["frame"].split("-")[1]) >= cfg["train_rollouts"]]
    tasks = {}
    for r in train:
        tasks.setdefault(r["meta"]["frame"], []).append(r["task"])
    assert len(tasks) == cfg["train_reasoning_rollouts"] * cfg["reasoning_frames"]
    assert all(ts.count("caption") == 1 and set(ts) == {"caption", "grounding", "reasoning"} for ts in tasks.values()), tasks


def test_every_reference_answer_scores_one_in_eval(micro_data):
    """eval.py parses the reference from the dataset's own answer text: the answer itself must score 1.0,
    called as eval_vlm calls score_answer (GemDataset item: answer, meta, image shape)."""
    import eval as E
    tok = data.load_tokenizer(os.path.join(micro_data, "tokenizer.json"))
    types = set()
    for split in sim_data.SPLITS:
        ds = data.GemDataset(micro_data, split, tok, image_size=64, n_image_tokens=16, head_size=16, max_len=4096)
        for i, r in enumerate(ds.records):
            if r["task"] in ("depth", "caption"):  # not benchmark questions (eval_vlm skips them)
                continue
            it = ds[i]
            score, _ = E.score_answer(E.KIND.get(it["type"], "exact"), it["answer"], it["answer"], it["meta"],
                                      tuple(it["image"].shape[-2:]))
            assert score == 1.0, (it["id"], it["type"], it["answer"])
            types.add(it["type"])
    assert types == set(sim_data.TYPE_FAMILY) - {"caption", "depth"}


def _leaky_records(n_frames, seed):
    """Records of a made-up "closer" question whose words give the answer away: the depth of an object
    follows its name (red cube nearest, then the blue can, the green ball; the plate always farthest) plus
    noise. Each record holds every ordered pair of its frame's 3 objects as candidates (sim_data.balance's input)."""
    rng, names = np.random.default_rng(seed), ["red cube", "blue can", "green ball", "plate"]
    recs = []
    for i in range(n_frames):
        objs = [int(k) for k in rng.choice(4, 3, replace=False)]
        z = {k: (10.0 if k == 3 else k + rng.normal(0, 1.5)) for k in objs}
        cands = []
        for a in objs:
            for b in objs:
                if a != b:
                    ans = "yes" if z[a] < z[b] else "no"
                    cands.append(dict(q=f"Is the {names[a]} closer to the camera than the {names[b]}?", a=ans, meta=dict(answer=ans),
                                      bal=[(f"a={names[a]}", ans), (f"b={names[b]}", ans), (f"ab={names[a]}|{names[b]}", ans), ("!", ans)]))
        cands = [cands[j] for j in rng.permutation(len(cands))]
        recs.append(dict(id=f"{seed}-{i}", image="x.png", task="reasoning", meta=dict(type="closer", frame=f"{seed}-{i}"), cands=cands))
    return recs


def test_balance_hides_a_planted_leak_from_the_text_only_baseline():
    """eval.py's text-only baseline reads a planted name -> answer leak when one question is drawn per frame at
    random, and reads nothing once sim_data.balance picks: yes and no are even, and the plate (always
    farthest: its name alone gives the answer) is never asked about."""
    import copy
    import eval as E
    draw = lambda recs: [sim_data._fill(r, r.pop("cands")[0]) for r in copy.deepcopy(recs)]  # noqa: E731
    text = {}
    for how, pick in (("random", draw), ("balanced", sim_data.balance)):
        train, test = pick(_leaky_records(600, 0)), pick(_leaky_records(400, 1))
        _, pred = E.text_only(train, test, "yesno")
        answers = [data.answer_of(r) for r in test]
        const = E.constant_answer("yesno", [data.answer_of(r) for r in train])
        text[how] = np.mean([pred[r["id"]] == a for r, a in zip(test, answers)]) - np.mean([const == a for a in answers])
        if how == "balanced":
            assert not any("plate" in data.question_of(r) for r in train + test)
            assert 0.45 <= np.mean([a == "yes" for a in answers]) <= 0.55
            assert len(test) > 300  # the plate's questions go, the frames stay
    assert text["random"] > 0.15 and text["balanced"] < 0.05, text


def test_letters_are_uniform_over_positions():
    """The correct option's letter is uniform over the positions of its option count."""
    import types
    sc = types.SimpleNamespace(rng=np.random.default_rng(0))
    for n_others in (1, 2, 3, 5):
        counts = {}
        for _ in range(800):
            opts, letter = sim_data._choices(sc, "right", [f"wrong{i}" for i in range(n_others)])
            assert opts["ABCD".index(letter)] == "right" and opts.count("right") == 1 and len(opts) == min(4, n_others + 1)
            counts[letter] = counts.get(letter, 0) + 1
        k = min(4, n_others + 1)
        assert sorted(counts) == list("ABCD"[:k]) and min(counts.values()) > 0.75 * 800 / k, counts


def test_restart_does_not_rewrite_finished_shards(tmp_path, monkeypatch):
    cfg = sim_data.GenConfig(**dict(sim_data.GEN_PRESETS["micro"], out=str(tmp_path), preset="micro"))
    real, calls, killed = sim_data.gen_shard, [], []

    def flaky(job):
        calls.append(job[1:])
        if len(calls) == 3 and not killed:
            killed.append(job)
            raise KeyboardInterrupt  # killed in the middle of the third shard (the first run only)
        return real(job)
    monkeypatch.setattr(sim_data, "gen_shard", flaky)
    with pytest.raises(KeyboardInterrupt):
        sim_data.generate(cfg)
    shards = sorted(os.listdir(tmp_path / "shards"))
    assert shards == ["train-0000.jsonl", "train-0001.jsonl"]  # complete shards only, no partial file
    before = {f: (os.stat(tmp_path / "shards" / f).st_mtime_ns, open(tmp_path / "shards" / f).read()) for f in shards}
    calls.clear()
    sim_data.generate(cfg)
    assert ("train", 0) not in calls and ("train", 1) not in calls
    for f, (mtime, text) in before.items():
        assert os.stat(tmp_path / "shards" / f).st_mtime_ns == mtime and open(tmp_path / "shards" / f).read() == text
    monkeypatch.setattr(sim_data, "gen_shard", real)
    # deterministic: a fresh run with the same seed writes the same records
    fresh = tmp_path / "again"
    sim_data.generate(sim_data.GenConfig(**dict(sim_data.GEN_PRESETS["micro"], out=str(fresh), preset="micro")))
    assert open(fresh / "test.jsonl").read() == open(tmp_path / "test.jsonl").read()


def _shard_job(tmp_path, split, k, **over):
    """gen_shard's job for shard k of a micro config with one rollout per shard (so rollout r = shard r)."""
    cfg = dataclasses.asdict(sim_data.GenConfig(**dict(sim_data.GEN_PRESETS["micro"], out=str(tmp_path), preset="micro",
                                                   shard=1, **over)))
    for d in ("images", "depth", "states", "shards"):
        os.makedirs(tmp_path / d, exist_ok=True)
    return cfg, split, k


def test_gen_shard_never_writes_a_failed_or_heldout_rollout(tmp_path, monkeypatch):
    import sim_env
    def fake_expert(ok):  # no simulation: the start state three times, success as given
        return lambda env, start: ([start] * 3, [0] * 3, ok)
    monkeypatch.setattr(sim_data, "expert_rollout", fake_expert(False))  # the expert never succeeds
    for split in ("train", "test"):
        with pytest.raises(RuntimeError, match=f"{split} rollout 0: no successful expert rollout"):
            sim_data.gen_shard(_shard_job(tmp_path, split, 0))
    # the expert succeeds, but every colour x shape is held out: train/val may not use any scene
    monkeypatch.setattr(sim_data, "expert_rollout", fake_expert(True))
    monkeypatch.setattr(sim_data, "HELDOUT_COMBOS", {(c, sh) for c in sim_env.COLOURS for sh in sim_env.HALF})
    with pytest.raises(RuntimeError, match="val rollout 0: .*held-out"):
        sim_data.gen_shard(_shard_job(tmp_path, "val", 0))
    assert os.listdir(tmp_path / "shards") == [] and os.listdir(tmp_path / "images") == []


class _Accepted(Exception):
    pass


def _largest_accepted(run, option, hi=10 ** 7, negative_refused=True):
    """The largest n >= 0 that run(n) accepts (raises _Accepted) rather than refuses (SystemExit naming option)."""
    def ok(n):
        try:
            run(n)
        except _Accepted:
            return True
        except SystemExit as e:
            assert "\n" not in str(e) and str(e).startswith("error: ") and option in str(e), e  # one line
            return False
        raise AssertionError("neither accepted nor refused")
    assert ok(0) and not ok(hi) and not (negative_refused and ok(-1))
    lo = 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def test_simulator_seed_ranges_are_disjoint(tmp_path, monkeypatch):
    """The seeds the code actually draws, at the largest settings it accepts: VLM train < val < test < demos <
    every evaluation start state (sim_env.eval_seeds), and two demo --seed values never share a scene."""
    import sim_env
    eval_lo = min(min(sim_env.eval_seeds(s, t)) for s in sim_env.SUITES for t in range(len(sim_env.SUITES[s])))
    monkeypatch.setattr(sim_data, "run_jobs", lambda *a, **k: (_ for _ in ()).throw(_Accepted()))
    seen = []  # scene seeds of the VLM rollouts: the expert "fails", so gen_shard tries every seed then raises
    monkeypatch.setattr(sim_data, "expert_rollout", lambda env, start: (seen.append(start["seed"]), [start], [0], False)[1:])

    class SeedOnly:  # gen_shard's simulator, minus the scene
        def __init__(self, suite, task_id, **kw):
            pass

        def reset(self, seed=None, options=None):
            self.seed = seed

        def get_state(self):
            return {"seed": self.seed, "objects": [], "start": []}
    ranges = []
    for split in sim_data.SPLITS:
        n = _largest_accepted(lambda n: sim_data.generate(sim_data.GenConfig(**dict(
            sim_data.GEN_PRESETS["micro"], out=str(tmp_path / f"{split}{n}"), shard=10 ** 9, **{f"{split}_rollouts": n}))),
            f"--{split}_rollouts")
        with monkeypatch.context() as m:
            m.setattr(sim_env, "TabletopEnv", SeedOnly)
            for k in (0, n - 1):  # the first and the last rollout of the split
                seen.clear()
                with pytest.raises(RuntimeError):
                    sim_data.gen_shard(_shard_job(tmp_path, split, k, reduce=0.0, **{f"{split}_rollouts": n}))
                ranges.append((min(seen), max(seen)))
    # demos: a fake simulator whose episodes end at once, unsuccessful, so demo_task runs through every try
    demo = {}

    class NoEpisode:
        def __init__(self, suite, task_id, **kw):
            self.key = (suite, task_id)

        def reset(self, seed=None, options=None):
            demo.setdefault((self.seed, self.key), []).append(seed)
            return {}, {"max_steps": 0, "success": False}
    cfg = lambda seed, per_task: sim_data.DemoConfig(out=str(tmp_path / "demos"), seed=seed, per_task=per_task)
    top = _largest_accepted(lambda s: sim_data.generate_demos(cfg(s, 1)), "--seed")
    per_task = _largest_accepted(lambda n: sim_data.generate_demos(cfg(top, n)), "--per_task", hi=4000, negative_refused=False)
    assert top >= 1 and per_task >= 50
    monkeypatch.setattr(sim_env, "TabletopEnv", NoEpisode)
    for seed in (0, top - 1, top):
        NoEpisode.seed = seed
        for suite in ("spatial", "long"):
            for t in range(len(sim_env.SUITES[suite])):
                assert sim_data.demo_task((dataclasses.asdict(cfg(seed, per_task)), suite, t))[2] == 0
    ranges.append((min(min(v) for v in demo.values()), max(max(v) for v in demo.values())))
    assert all(a[1] < b[0] for a, b in zip(ranges, ranges[1:])), ranges  # each range below the next
    assert ranges[-1][1] < eval_lo
    for key in {k for _, k in demo}:  # one task's scenes: distinct tries, never shared between --seed values
        runs = [demo[(s, key)] for s in (0, top - 1, top)]
        assert len(set().union(*runs)) == sum(map(len, runs)) == 3 * len(runs[0]) > 3 * per_task
    assert sim_data.demo_seed(0, 3, 7) == 903_007  # --seed=0 keeps its old seeds: existing demo folders stay valid


def test_demo_seeds_refuse_settings_reaching_the_eval_states(tmp_path, monkeypatch):
    monkeypatch.setattr(sim_data, "run_jobs", lambda *a, **k: (_ for _ in ()).throw(_Accepted()))  # fail fast if accepted
    for over, want in ((dict(seed=1000), "--seed=1000 out of range"), (dict(seed=-1), "--seed=-1 out of range"),
                       (dict(per_task=10 ** 6), "--per_task")):
        with pytest.raises(SystemExit) as e:
            sim_data.generate_demos(sim_data.DemoConfig(out=str(tmp_path / "d"), **over))
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith("error: ") and want in msg and "evaluation start states" in msg, msg
    assert not os.path.exists(tmp_path / "d")  # refused before any work


# ----------------------------------------------------------------------------------------------------
# Demos

def test_demos_replay_exactly_and_succeed(micro_demos):
    import sim_env
    files = data.episode_files(micro_demos)
    assert len(files) == 4
    for p in files:
        ep = data.load_episode(p)
        env = sim_env.TabletopEnv(ep["suite"], ep["task_id"], image_size=64, render_images=False)
        obs, _ = env.reset(options={"state": ep["sim_states"][0]})
        assert ep["actions"].shape == (len(ep["states"]), 7) and ep["states"].shape[1] == 8
        for t, a in enumerate(ep["actions"]):
            assert np.array_equal(obs["state"], ep["states"][t])
            before = sim_data._physical(env.get_state())
            obs, _, term, trunc, info = env.step(a)
            assert sim_data._physical(env.get_state()) != before  # no no-op steps kept
            assert sim_data._physical(env.get_state()) == sim_data._physical(ep["sim_states"][t + 1])
        assert info["success"]
        assert ep["instruction"] == ep["sim_states"][0]["instruction"]
    # a rerun (e.g. after an interruption) re-simulates but never rewrites a finished episode
    mtimes = {p: os.stat(p).st_mtime_ns for p in files}
    sim_data.generate_demos(sim_data.DemoConfig(out=micro_demos, suite="goal", tasks="0,6", per_task=2, workers=1))
    assert {p: os.stat(p).st_mtime_ns for p in data.episode_files(micro_demos)} == mtimes
