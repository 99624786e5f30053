"""data.py: tokenizer, chat template, depth targets and PNG I/O, JSONL validation, datasets, and the
generated micro data re-checked against the simulator by independent functions (fixtures in conftest.py)."""
import dataclasses
import json
import math
import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import data


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = ["Is the red cube left of the blue ball?", "yes", "no", "[12, 345, 678, 999]", "Describe the objects."]
    return data.train_tokenizer(texts * 20, str(tmp_path_factory.mktemp("tok") / "tokenizer.json"), vocab_size=300)


def test_tokenizer_round_trip_and_special_tokens(tok, tmp_path):
    path = str(tmp_path / "t.json")
    tok.save(path)
    tok2 = data.load_tokenizer(path)
    ids = data.special_ids(tok2)
    assert sorted(ids.values()) == list(range(6))  # the six special tokens come first
    for text in ["Point to the white ball.", "(123, 45) [0, 999, 5, 6]; ünïcode ✓", "  spaces\n\nnewlines "]:
        enc = tok2.encode(text, add_special_tokens=False).ids
        assert tok2.decode(enc, skip_special_tokens=False) == text
    enc = tok2.encode("<|im_start|>user<|im_end|>", add_special_tokens=False).ids
    assert enc[0] == ids["im_start_id"] and enc[-1] == ids["im_end_id"]
    assert all(len(tok2.encode(d, add_special_tokens=False).ids) == 1 for d in "0123456789")


def test_chat_template_masks_exactly_the_assistant_tokens(tok):
    s = data.special_ids(tok)
    conv = [{"from": "human", "value": "<image>\nIs the red cube left of the blue ball?"}, {"from": "gpt", "value": "yes"},
            {"from": "human", "value": "And the box?"}, {"from": "gpt", "value": "[1, 2, 3, 4]"}]
    ids, labels = data.encode_chat(tok, conv, n_image_tokens=9)
    assert len(ids) == len(labels)
    text = tok.decode(ids, skip_special_tokens=False)
    assert text == ("<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * 9 + "<|vision_end|>\nIs the red cube left of the"
                    " blue ball?<|im_end|>\n<|im_start|>assistant\nyes<|im_end|>\n<|im_start|>user\nAnd the box?<|im_end|>\n"
                    "<|im_start|>assistant\n[1, 2, 3, 4]<|im_end|>\n")
    # labelled spans, found independently from the decoded ids: each assistant body + its <|im_end|>
    spans = [[i for i in range(len(ids)) if labels[i] != -100]]
    got = tok.decode([ids[i] for i in spans[0]], skip_special_tokens=False)
    assert got == "yes<|im_end|>[1, 2, 3, 4]<|im_end|>"
    assert all(labels[i] == ids[i] for i in spans[0])
    assert ids.count(s["image_pad_id"]) == 9
    prompt = data.encode_prompt(tok, conv[0]["value"], 9)
    assert prompt == ids[:len(prompt)] and tok.decode(prompt[-3:], skip_special_tokens=False).endswith("assistant\n")
    late = data.encode_prompt(tok, conv[0]["value"], 9, image_first=False)
    assert sorted(late) == sorted(prompt)  # same tokens, image moved after the question
    assert tok.decode(late, skip_special_tokens=False).startswith("<|im_start|>user\nIs the red cube left of the blue ball?\n<|vision_start|>")


def test_depth_png_round_trip_within_1mm(tmp_path):
    rng = np.random.default_rng(0)
    d = rng.uniform(0.2, 3.0, (17, 23)).astype(np.float32)
    d[0, :3] = 0.0
    d[1, 0] = np.nan
    data.save_depth_png(str(tmp_path / "d.png"), d)
    back = data.load_depth_png(str(tmp_path / "d.png"))
    ok = np.isfinite(d) & (d > 0)
    assert np.abs(back[ok] - d[ok]).max() <= 0.0005 + 1e-6
    assert (back[~ok] == 0).all()


def test_depth_target_matches_independent_formula():
    rng = np.random.default_rng(1)
    d = rng.uniform(0.3, 2.0, (8, 8))
    d[0, 0] = 0.0  # invalid: ignored by the percentiles
    t = data.depth_target(d, 8)[0].numpy()
    vals = sorted(1.0 / d[d > 0])
    n = len(vals)  # linear-interpolated 2nd / 98th percentiles written out by hand
    def pct(q):
        pos = q / 100 * (n - 1)
        lo = int(math.floor(pos))
        return vals[lo] + (vals[min(lo + 1, n - 1)] - vals[lo]) * (pos - lo)
    lo, hi = pct(2), pct(98)
    for (i, j) in [(0, 1), (3, 4), (7, 7)]:
        x = min(1.0, max(0.0, (1.0 / d[i, j] - lo) / (hi - lo)))
        assert abs(t[i, j] - (1 - x)) < 1e-5
    near = np.unravel_index(np.argmin(np.where(d > 0, d, 9)), d.shape)
    assert t[near] == 0.0 and t.max() == 1.0
    small = data.depth_target(d, 4)
    assert small.shape == (1, 4, 4) and abs(float(small[0, 1, 1]) - float(np.mean(t[2:4, 2:4]))) < 1e-5
    # a cell with an invalid pixel is the mean of its valid pixels only (not pulled towards "far")
    assert abs(float(small[0, 0, 0]) - float(np.mean([t[0, 1], t[1, 0], t[1, 1]]))) < 1e-5


def test_depth_mask_keeps_cells_at_least_half_valid():
    d = np.ones((8, 8))
    d[0:2, 0:2] = 0.0             # cell (0, 0) of a 4x4 grid: no valid pixel
    d[2, 2] = d[2, 3] = 0.0       # cell (1, 1): half valid -> kept
    d[4, 4] = d[4, 5] = d[5, 4] = np.nan  # cell (2, 2): a quarter valid -> dropped
    m = data.depth_mask(d, 4)[0].numpy()
    expect = np.ones((4, 4), bool)
    expect[0, 0] = expect[2, 2] = False
    assert m.dtype == bool and (m == expect).all()
    assert float(data.depth_target(d, 4)[0, 0, 0]) == 1.0  # no valid pixel: far, and masked out of the loss


def test_pixel_values_and_rgb_target():
    rgb = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3) * 5
    pv = data.to_pixel_values(torch.from_numpy(rgb).permute(2, 0, 1))
    assert pv.shape == (3, 4, 4) and torch.allclose(pv[:, 1, 2], torch.tensor(rgb[1, 2], dtype=torch.float32) / 127.5 - 1)
    assert data.to_pixel_values(torch.full((3, 2, 2), 255, dtype=torch.uint8)).max() == 1.0
    assert data.to_pixel_values(torch.zeros(3, 2, 2, dtype=torch.uint8)).min() == -1.0
    rt = data.rgb_target(rgb, 2)
    assert rt.shape == (3, 2, 2) and abs(float(rt[0, 0, 0]) - rgb[:2, :2, 0].mean() / 255) < 1e-6


def _write_gem250k(root, tok_path=None, n=3, size=16):
    """A GEM-250K-style folder: images only, no depth field, no meta."""
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    recs = []
    for i in range(n):
        Image.fromarray(np.full((size, size, 3), 40 * i, np.uint8)).save(os.path.join(root, "images", f"{i}.png"))
        recs.append({"id": str(i), "image": f"images/{i}.png", "task": "reasoning",
                     "conversations": [{"from": "human", "value": "<image>\nIs it red?"}, {"from": "gpt", "value": "no"}]})
    with open(os.path.join(root, "train.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    return recs


def test_gem250k_records_without_depth_load_masked(tok, tmp_path):
    _write_gem250k(str(tmp_path))
    ds = data.GemDataset(str(tmp_path), "train", tok, image_size=16, n_image_tokens=4, head_size=8)
    item = ds[1]
    assert item["depth_valid"] is False and item["depth_target"].shape == (1, 8, 8)
    assert item["answer"] == "no" and item["question"] == "Is it red?" and item["type"] == "reasoning"
    b = data.collate([ds[0], ds[1], ds[2]], pad_id=data.special_ids(tok)["pad_id"])
    assert b["depth_valid"].tolist() == [False] * 3 and b["pixel_values"].shape == (3, 3, 16, 16)
    assert b["attention_mask"].all()  # equal lengths here


def test_collate_pads_right():
    items = [dict(input_ids=torch.tensor([5, 6, 7]), labels=torch.tensor([-100, 6, 7]), x=torch.zeros(2), ok=True, id="a"),
             dict(input_ids=torch.tensor([8]), labels=torch.tensor([8]), x=torch.ones(2), ok=False, id="b")]
    b = data.collate(items, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert b["attention_mask"].tolist() == [[True] * 3, [True, False, False]]
    assert b["ok"].tolist() == [True, False] and b["id"] == ["a", "b"] and b["x"].shape == (2, 2)


def _expect_error(fn, *needles):
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg


def test_bad_inputs_give_one_line_errors(tok, tmp_path):
    root = str(tmp_path)
    _write_gem250k(root)
    path = os.path.join(root, "train.jsonl")
    lines = open(path).read().splitlines()
    mk = lambda: data.GemDataset(root, "train", tok, image_size=16, n_image_tokens=4, head_size=8)

    def write(new_lines):
        with open(path, "w") as f:
            f.write("\n".join(new_lines) + "\n")
    write(lines[:1] + ['{"id": "x", "image": '] + lines[2:])
    _expect_error(mk, "train.jsonl:2", "malformed")
    bad = json.loads(lines[2]); bad["task"] = "dancing"
    write(lines[:2] + [json.dumps(bad)])
    _expect_error(mk, "train.jsonl:3", "unknown task family", "dancing")
    bad = json.loads(lines[2]); bad["image"] = "images/nope.png"
    write(lines[:2] + [json.dumps(bad)])
    _expect_error(mk, "train.jsonl:3", "nope.png")
    write(lines)
    with open(os.path.join(root, "images", "1.png"), "wb") as f:
        f.write(b"not a png at all")
    ds = mk()
    _expect_error(lambda: ds[1], "1.png", "train.jsonl:2", "cannot read image")
    bad = json.loads(lines[1]); bad["conversations"][0]["value"] = "<image>\n<image>\nIs it red?"
    write(lines[:1] + [json.dumps(bad)])
    _expect_error(mk, "train.jsonl:2", "2 <image> tags", "1 image")
    bad = json.loads(lines[0]); bad["depth"] = "images/0.png"  # an RGB file where depth should be
    write([json.dumps(bad)])
    _expect_error(lambda: mk()[0], "0.png", "train.jsonl:1", "depth")
    _expect_error(lambda: data.GemDataset(root, "val", tok, 16, 4, 8), "val.jsonl")


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
        assert f" {data.RELATIONS[m['rel']]} the {objs[m['ref']]['name']}" in q, r["id"]
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
        vis = {o["name"] for o in info["objects"] if (seg == o["id"]).sum() >= data.MIN_VISIBLE * 64 * 64}
        assert set(ans_text.split(", ")) == vis
    elif typ == "depth":
        assert [t["from"] for t in r["conversations"]] == ["human"]
    else:
        raise AssertionError(f"unchecked type {typ}")
    return typ


def test_every_generated_answer_rechecked_against_the_simulator(micro_data):
    recs = _records(micro_data)
    seen = {check_record(micro_data, r) for r in recs}
    assert seen == set(data.TYPE_FAMILY) | {"depth"}  # the micro preset covers every type
    stats = json.load(open(os.path.join(micro_data, "stats.json")))
    assert sum(s["samples"] for s in stats["splits"].values()) == len(recs)


def test_every_vlm_image_has_its_own_camera_and_objects_their_own_sizes(micro_data):
    """The camera of each frame, re-derived from its stored state (position, look-at, fov), lies in the
    documented VIEW ranges; the cameras differ; movable objects are scaled within SCALE (cubes and balls
    uniformly), and the same shape comes in several heights."""
    import sim_env
    views, heights = set(), {}
    for f in sorted(os.listdir(os.path.join(micro_data, "states"))):
        st = json.load(open(os.path.join(micro_data, "states", f)))["state"]
        cam, look, fov = np.array(st["aug"]["cam"]), np.array(st["aug"]["look"]), st["aug"]["fov"]
        v = cam - look
        dist, pitch = np.linalg.norm(v), math.degrees(math.asin(v[2] / np.linalg.norm(v)))
        yaw = math.degrees(math.atan2(v[0], -v[1]))
        for name, x in (("dist", dist), ("pitch", pitch), ("yaw", yaw), ("fov", fov), ("look_x", look[0]), ("look_y", look[1])):
            lo, hi = data.VIEW[name]
            assert lo - 1e-6 <= x <= hi + 1e-6, (f, name, x)
        assert look[2] == 0.0
        views.add(round(float(cam[0]), 4))
        obs, info, _, _ = _frame(micro_data, f[:-5])
        assert np.isclose(info["K"][0][0], 32 / math.tan(math.radians(fov) / 2))  # the rendered camera is this one
        for o in st["objects"]:
            if o["shape"] in sim_env.SHAPES:
                r = np.array(o["half_extents"]) / np.array(sim_env.HALF[o["shape"]])
                if o["shape"] in ("cube", "ball"):
                    assert np.allclose(r, r[0]) and data.SCALE["uniform"][0] <= r[0] <= data.SCALE["uniform"][1]
                else:
                    assert np.isclose(r[0], r[1]) and data.SCALE["xy"][0] <= r[0] <= data.SCALE["xy"][1]
                    assert data.SCALE["z"][0] <= r[2] <= data.SCALE["z"][1]
                heights.setdefault(o["shape"], set()).add(round(o["half_extents"][2], 5))
    assert len(views) > 5
    assert any(len(h) > 2 for h in heights.values())


def test_select_scenes_cuts_whole_scenes_disjoint_and_nested():
    recs = [dict(id=f"{k}-{j}", image=f"images/train-{k:05d}-{t:03d}.png", meta=dict(frame=f"train-{k:05d}-{t:03d}"))
            for k in range(50) for t in (0, 7) for j in range(3)]
    scenes = lambda rs: {r["meta"]["frame"][:11] for r in rs}
    a, b, rest = data.select_scenes(recs, 0, 0.2), data.select_scenes(recs, 0, 0.6), data.select_scenes(recs, 0.6, 1)
    assert len(scenes(a)) == 10 and len(scenes(b)) == 30 and len(scenes(rest)) == 20
    assert scenes(a) <= scenes(b) and not scenes(b) & scenes(rest)
    assert len(a) == 10 * 6  # every record of a kept scene (both frames, every question)
    assert scenes(a) != {f"train-{k:05d}" for k in range(10)}  # not simply the first scenes


def test_blind_dataset_shows_one_grey_image(micro_data):
    kw = dict(tok=data.load_tokenizer(os.path.join(micro_data, "tokenizer.json")), image_size=64, n_image_tokens=16, head_size=16)
    seeing, blind = data.GemDataset(micro_data, "train", **kw), data.GemDataset(micro_data, "train", blind=True, **kw)
    grey = torch.full((3, 64, 64), 128, dtype=torch.uint8)
    for i in (0, len(blind) // 2, len(blind) - 1):
        assert torch.equal(blind[i]["image"], grey)
        assert not torch.equal(seeing[i]["image"], grey)
        assert torch.equal(blind[i]["input_ids"], seeing[i]["input_ids"])  # the same text
    # what the model sees: collate turns the grey uint8 image into the preprocessing of a grey RGB array
    b = data.collate([blind[0], blind[1]], 0)
    assert torch.allclose(b["pixel_values"][1], torch.full((3, 64, 64), 128 / 127.5 - 1), atol=1e-7, rtol=0)


def test_split_rules_heldout_templates_and_combos(micro_data):
    for s in ("train", "val"):
        for r in data.read_jsonl(os.path.join(micro_data, f"{s}.jsonl")):
            q = r["conversations"][0]["value"]
            assert not any(f"{c} {sh}" in q + r["conversations"][-1]["value"] for c, sh in data.HELDOUT_COMBOS)
            assert not r["meta"].get("heldout_template")
            held = [t for typ, (_, ht) in data.TEMPLATES.items() for t in ht if t]
            assert all(q.split("\n", 1)[-1] != h for h in held)
    test = data.read_jsonl(os.path.join(micro_data, "test.jsonl"))
    assert any(r["meta"].get("heldout_template") for r in test)


def test_gem_dataset_on_micro_data(micro_data):
    tok = data.load_tokenizer(os.path.join(micro_data, "tokenizer.json"))
    ds = data.GemDataset(micro_data, "train", tok, image_size=64, n_image_tokens=16, head_size=16)
    s = data.special_ids(tok)
    for i in range(0, len(ds), 7):
        it = ds[i]
        ids, labels = it["input_ids"].tolist(), it["labels"].tolist()
        assert ids.count(s["image_pad_id"]) == 16 and it["depth_valid"] is True
        lab = [t for t, l in zip(ids, labels) if l != -100]
        want = tok.encode(it["answer"], add_special_tokens=False).ids + [s["im_end_id"]] if it["answer"] else []
        assert lab == want  # the loss covers exactly the answer and its closing <|im_end|>
        assert torch.allclose(it["depth_m"], torch.from_numpy(data.load_depth_png(os.path.join(micro_data, "depth", it["meta"]["frame"] + ".png"))))
        assert 0 <= float(it["depth_target"].min()) and float(it["depth_target"].max()) <= 1
    caps = data.GemDataset(micro_data, "train", tok, 64, 16, 16, families=["caption"])
    assert len(caps) > 0 and all(r["task"] == "caption" for r in caps.records)


def test_every_reference_answer_scores_one_in_eval(micro_data):
    """eval.py parses the reference from the dataset's own answer text: the answer itself must score 1.0,
    called as eval_vlm calls score_answer (GemDataset item: answer, meta, image shape)."""
    import eval as E
    tok = data.load_tokenizer(os.path.join(micro_data, "tokenizer.json"))
    types = set()
    for split in data.SPLITS:
        ds = data.GemDataset(micro_data, split, tok, image_size=64, n_image_tokens=16, head_size=16, max_len=4096)
        for i, r in enumerate(ds.records):
            if r["task"] in ("depth", "caption"):  # not benchmark questions (eval_vlm skips them)
                continue
            it = ds[i]
            score, _ = E.score_answer(E.KIND.get(it["type"], "exact"), it["answer"], it["answer"], it["meta"],
                                      tuple(it["image"].shape[-2:]))
            assert score == 1.0, (it["id"], it["type"], it["answer"])
            types.add(it["type"])
    assert types == set(data.TYPE_FAMILY) - {"caption", "depth"}


def test_answers_are_balanced():
    """yes/no and letter positions are chosen before the question: over many draws they are uniform."""
    import types
    import sim_env
    env = sim_env.TabletopEnv("goal", 0, image_size=64)
    obs, info = env.reset(seed=3)
    yes, n = 0, 400
    for i in range(n):
        yes += data.q_rel_yn(data.Scene(obs, info, "train", np.random.default_rng([7, i])))[1] == "yes"
    assert 0.4 < yes / n < 0.6
    sc = types.SimpleNamespace(rng=np.random.default_rng(0))
    for n_others in (1, 2, 3, 5):
        counts = {}
        for _ in range(800):
            opts, letter = data._choices(sc, "right", [f"wrong{i}" for i in range(n_others)])
            assert opts["ABCD".index(letter)] == "right" and opts.count("right") == 1 and len(opts) == min(4, n_others + 1)
            counts[letter] = counts.get(letter, 0) + 1
        k = min(4, n_others + 1)
        assert sorted(counts) == list("ABCD"[:k]) and min(counts.values()) > 0.75 * 800 / k, counts


def test_restart_does_not_rewrite_finished_shards(tmp_path, monkeypatch):
    cfg = data.GenConfig(**dict(data.GEN_PRESETS["micro"], out=str(tmp_path), preset="micro"))
    real, calls = data.gen_shard, []

    def flaky(job):
        calls.append(job[1:])
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed in the middle of the third shard
        return real(job)
    monkeypatch.setattr(data, "gen_shard", flaky)
    with pytest.raises(KeyboardInterrupt):
        data.generate(cfg)
    shards = sorted(os.listdir(tmp_path / "shards"))
    assert shards == ["train-0000.jsonl", "train-0001.jsonl"]  # complete shards only, no partial file
    before = {f: (os.stat(tmp_path / "shards" / f).st_mtime_ns, open(tmp_path / "shards" / f).read()) for f in shards}
    calls.clear()
    data.generate(cfg)
    assert ("train", 0) not in calls and ("train", 1) not in calls
    for f, (mtime, text) in before.items():
        assert os.stat(tmp_path / "shards" / f).st_mtime_ns == mtime and open(tmp_path / "shards" / f).read() == text
    monkeypatch.setattr(data, "gen_shard", real)
    # deterministic: a fresh run with the same seed writes the same records
    fresh = tmp_path / "again"
    data.generate(data.GenConfig(**dict(data.GEN_PRESETS["micro"], out=str(fresh), preset="micro")))
    assert open(fresh / "test.jsonl").read() == open(tmp_path / "test.jsonl").read()


def _shard_job(tmp_path, split, k, **over):
    """gen_shard's job for shard k of a micro config with one rollout per shard (so rollout r = shard r)."""
    cfg = dataclasses.asdict(data.GenConfig(**dict(data.GEN_PRESETS["micro"], out=str(tmp_path), preset="micro",
                                                   shard=1, **over)))
    for d in ("images", "depth", "states", "shards"):
        os.makedirs(tmp_path / d, exist_ok=True)
    return cfg, split, k


def test_gen_shard_never_writes_a_failed_or_heldout_rollout(tmp_path, monkeypatch):
    import sim_env
    def fake_expert(ok):  # no simulation: the start state three times, success as given
        return lambda env, start: ([start] * 3, [0] * 3, ok)
    monkeypatch.setattr(data, "expert_rollout", fake_expert(False))  # the expert never succeeds
    for split in ("train", "test"):
        with pytest.raises(RuntimeError, match=f"{split} rollout 0: no successful expert rollout"):
            data.gen_shard(_shard_job(tmp_path, split, 0))
    # the expert succeeds, but every colour x shape is held out: train/val may not use any scene
    monkeypatch.setattr(data, "expert_rollout", fake_expert(True))
    monkeypatch.setattr(data, "HELDOUT_COMBOS", {(c, sh) for c in sim_env.COLOURS for sh in sim_env.HALF})
    with pytest.raises(RuntimeError, match="val rollout 0: .*held-out"):
        data.gen_shard(_shard_job(tmp_path, "val", 0))
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
    monkeypatch.setattr(data, "_run_jobs", lambda *a, **k: (_ for _ in ()).throw(_Accepted()))
    seen = []  # scene seeds of the VLM rollouts: the expert "fails", so gen_shard tries every seed then raises
    monkeypatch.setattr(data, "expert_rollout", lambda env, start: (seen.append(start["seed"]), [start], [0], False)[1:])

    class SeedOnly:  # gen_shard's simulator, minus the scene
        def __init__(self, suite, task_id, **kw):
            pass

        def reset(self, seed=None, options=None):
            self.seed = seed

        def get_state(self):
            return {"seed": self.seed, "objects": [], "start": []}
    ranges = []
    for split in data.SPLITS:
        n = _largest_accepted(lambda n: data.generate(data.GenConfig(**dict(
            data.GEN_PRESETS["micro"], out=str(tmp_path / f"{split}{n}"), shard=10 ** 9, **{f"{split}_rollouts": n}))),
            f"--{split}_rollouts")
        with monkeypatch.context() as m:
            m.setattr(sim_env, "TabletopEnv", SeedOnly)
            for k in (0, n - 1):  # the first and the last rollout of the split
                seen.clear()
                with pytest.raises(RuntimeError):
                    data.gen_shard(_shard_job(tmp_path, split, k, reduce=0.0, **{f"{split}_rollouts": n}))
                ranges.append((min(seen), max(seen)))
    # demos: a fake simulator whose episodes end at once, unsuccessful, so demo_task runs through every try
    demo = {}

    class NoEpisode:
        def __init__(self, suite, task_id, **kw):
            self.key = (suite, task_id)

        def reset(self, seed=None, options=None):
            demo.setdefault((self.seed, self.key), []).append(seed)
            return {}, {"max_steps": 0, "success": False}
    cfg = lambda seed, per_task: data.DemoConfig(out=str(tmp_path / "demos"), seed=seed, per_task=per_task)
    top = _largest_accepted(lambda s: data.generate_demos(cfg(s, 1)), "--seed")
    per_task = _largest_accepted(lambda n: data.generate_demos(cfg(top, n)), "--per_task", hi=4000, negative_refused=False)
    assert top >= 1 and per_task >= 50
    monkeypatch.setattr(sim_env, "TabletopEnv", NoEpisode)
    for seed in (0, top - 1, top):
        NoEpisode.seed = seed
        for suite in ("spatial", "long"):
            for t in range(len(sim_env.SUITES[suite])):
                assert data.demo_task((dataclasses.asdict(cfg(seed, per_task)), suite, t))[2] == 0
    ranges.append((min(min(v) for v in demo.values()), max(max(v) for v in demo.values())))
    assert all(a[1] < b[0] for a, b in zip(ranges, ranges[1:])), ranges  # each range below the next
    assert ranges[-1][1] < eval_lo
    for key in {k for _, k in demo}:  # one task's scenes: distinct tries, never shared between --seed values
        runs = [demo[(s, key)] for s in (0, top - 1, top)]
        assert len(set().union(*runs)) == sum(map(len, runs)) == 3 * len(runs[0]) > 3 * per_task
    assert data.demo_seed(0, 3, 7) == 903_007  # --seed=0 keeps its old seeds: existing demo folders stay valid


def test_demo_seeds_refuse_settings_reaching_the_eval_states(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_run_jobs", lambda *a, **k: (_ for _ in ()).throw(_Accepted()))  # fail fast if accepted
    for over, want in ((dict(seed=1000), "--seed=1000 out of range"), (dict(seed=-1), "--seed=-1 out of range"),
                       (dict(per_task=10 ** 6), "--per_task")):
        with pytest.raises(SystemExit) as e:
            data.generate_demos(data.DemoConfig(out=str(tmp_path / "d"), **over))
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
            before = data._physical(env.get_state())
            obs, _, term, trunc, info = env.step(a)
            assert data._physical(env.get_state()) != before  # no no-op steps kept
            assert data._physical(env.get_state()) == data._physical(ep["sim_states"][t + 1])
        assert info["success"]
        assert ep["instruction"] == ep["sim_states"][0]["instruction"]
    # a rerun (e.g. after an interruption) re-simulates but never rewrites a finished episode
    mtimes = {p: os.stat(p).st_mtime_ns for p in files}
    data.generate_demos(data.DemoConfig(out=micro_demos, suite="goal", tasks="0,6", per_task=2, workers=1))
    assert {p: os.stat(p).st_mtime_ns for p in data.episode_files(micro_demos)} == mtimes


def test_demo_dataset_and_obs_to_inputs_match_the_policy_path(micro_demos, micro_data):
    import sim_env
    tok = data.load_tokenizer(os.path.join(micro_data, "tokenizer.json"))
    stats = json.load(open(os.path.join(micro_demos, "norm_stats.json")))
    ds = data.DemoDataset(micro_demos, tok, image_size=64, horizon=8, head_size=16, n_image_tokens=16)
    ep0 = data.load_episode(ds.files[0])
    T = len(ep0["actions"])
    it = ds[T - 3]  # near the end: the chunk is padded
    assert it["action_mask"].tolist() == [True] * 3 + [False] * 5
    assert torch.allclose(data.unnormalize(it["actions"][:3], stats, "action"), torch.from_numpy(ep0["actions"][T - 3:]), atol=1e-6)
    # the Policy's path: a live environment observation -> obs_to_inputs, identical tensors
    env = sim_env.TabletopEnv(ep0["suite"], ep0["task_id"], image_size=64)
    obs, _ = env.reset(options={"state": ep0["sim_states"][T - 3]})
    cfg = type("C", (), dict(image_size=64, n_image_tokens=16))()
    live = data.obs_to_inputs(obs, tok, cfg, stats)
    for k in ("input_ids", "image", "state"):
        assert torch.equal(live[k], it[k]), k
    assert live["image"].dtype == torch.uint8 and torch.equal(live["image"].permute(1, 2, 0), torch.from_numpy(obs["rgb"]))
    # the prompt ids are memoised per instruction: another instruction gets its own
    other = data.obs_to_inputs(dict(obs, instruction="open the drawer"), tok, cfg, stats)["input_ids"]
    assert not torch.equal(other, live["input_ids"]) and tok.decode(other.tolist()).rstrip().endswith(
        "to open the drawer?\nassistant")
    assert tok.decode(live["input_ids"].tolist(), skip_special_tokens=True).strip().endswith(
        "What action should the robot take to " + ep0["instruction"] + "?\nassistant")
    x = torch.randn(5, 8)
    assert torch.allclose(data.unnormalize(data.normalize(x, stats, "state"), stats, "state"), x, atol=1e-5)
    with pytest.raises(ValueError, match="image_size"):
        data.obs_to_inputs(dict(obs, rgb=obs["rgb"][:32, :32]), tok, cfg, stats)


def _copy_micro(micro_data, tmp_path):
    root = tmp_path / "d"
    shutil.copytree(micro_data, root, ignore=shutil.ignore_patterns("cache"))
    return str(root)


def test_cache_gives_the_same_items_as_the_files_and_is_rebuilt_when_stale(micro_data, tmp_path):
    root = _copy_micro(micro_data, tmp_path)
    tok = data.load_tokenizer(os.path.join(root, "tokenizer.json"))
    kw = dict(tok=tok, image_size=64, n_image_tokens=16, head_size=16, max_len=96)
    for extra in (dict(), dict(families=["reasoning", "depth"], scenes=(0.0, 0.7)), dict(blind=True)):
        files, cached = data.GemDataset(root, "train", **kw, **extra), data.GemDataset(root, "train", cache=True, **kw, **extra)
        assert [r["id"] for r in files.records] == [r["id"] for r in cached.records]
        for i in range(len(files)):
            a, b = files[i], cached[i]
            assert a.keys() == b.keys()
            for k in a:
                assert (torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype) if torch.is_tensor(a[k]) else a[k] == b[k], (i, k)
    made = sorted(os.listdir(os.path.join(root, "cache")))
    assert len(made) == 1 and made[0].startswith("train-")  # one cache serves every filter
    # an image rewritten in place, another head size, another tokenizer: each is a new cache, never the old one
    r0 = cached.records[0]
    img = os.path.join(root, r0["image"])
    Image.fromarray(255 - np.array(Image.open(img))).save(img)
    fresh = data.GemDataset(root, "train", cache=True, **kw)
    assert torch.equal(fresh[0]["image"], data.GemDataset(root, "train", **kw)[0]["image"])
    assert not torch.equal(fresh[0]["image"], cached[0]["image"])
    data.GemDataset(root, "train", cache=True, **(kw | dict(head_size=32)))
    other = str(tmp_path / "tok.json")
    data.train_tokenizer(["a few other words"], other, 300)
    data.GemDataset(root, "train", cache=True, **(kw | dict(tok=data.load_tokenizer(other))))
    assert len(os.listdir(os.path.join(root, "cache"))) == 4
    # a half-written cache (a build killed before its rename) is never read; cache_root puts it elsewhere
    os.makedirs(os.path.join(root, "cache", "val-0000000000000000.tmp-1"))
    out = tmp_path / "elsewhere"
    v = data.GemDataset(root, "val", cache=True, cache_root=str(out), **kw)
    assert torch.equal(v[0]["depth_target"], data.GemDataset(root, "val", **kw)[0]["depth_target"])
    assert [p.name.split("-")[0] for p in out.iterdir()] == ["val"]


def test_cache_built_by_several_processes_equals_one(micro_data, tmp_path, monkeypatch):
    """build_cache's images decoded by worker processes, in jobs of CACHE_CHUNK images, fill every row as one
    process does."""
    tok = data.load_tokenizer(os.path.join(micro_data, "tokenizer.json"))
    ds = data.GemDataset(micro_data, "train", tok=tok, image_size=64, n_image_tokens=16, head_size=16, max_len=96)
    monkeypatch.setattr(data, "CACHE_CHUNK", 4)  # several jobs for the micro data's images
    one = data.build_cache(ds, ds.records, str(tmp_path / "one" / "train"), workers=1)
    three = data.build_cache(ds, ds.records, str(tmp_path / "three" / "train"), workers=3)
    assert len(one["images"]) > 3 * 4
    for k in data.CACHE_ARRAYS:
        assert np.array_equal(one[k], three[k]), k
    for i in range(len(ds)):  # and against the files, record by record (every job's rows were written)
        item, row = ds[i], int(three["image_of"][i])
        assert np.array_equal(three["images"][row], item["image"].numpy()), i
        assert np.array_equal(three["depth_target"][row], item["depth_target"].numpy()), i


def test_demo_frame_cache_equals_rendering_and_follows_the_files(micro_demos, micro_data, tmp_path):
    """The memory-mapped demo frames (built by 2 worker processes) give exactly the items that rendering
    every sample gives, at every episode boundary; a changed episode file gets a new cache."""
    import shutil
    tok = data.load_tokenizer(os.path.join(micro_data, "tokenizer.json"))
    demos = str(tmp_path / "demos")
    shutil.copytree(micro_demos, demos, ignore=shutil.ignore_patterns("cache"))
    kw = dict(tok=tok, image_size=64, horizon=8, head_size=16, n_image_tokens=16)
    cached, fresh = data.DemoDataset(demos, cache=True, workers=2, **kw), data.DemoDataset(demos, cache=False, **kw)
    firsts = [int(o) for o in cached.offsets[:-1]]
    idx = sorted({0, len(cached) - 1} | {i for o in firsts for i in (o - 1, o, o + 1) if 0 <= i < len(cached)})
    assert len(cached.eps) >= 2 and len(idx) >= 6
    for i in idx:
        a, b = cached[i], fresh[i]
        for k, v in b.items():
            assert (torch.equal(a[k], v) if torch.is_tensor(v) else a[k] == v), (i, k)
    dirs = lambda: sorted(d for d in os.listdir(os.path.join(demos, "cache")) if d.startswith("frames-"))
    assert len(dirs()) == 1
    data.DemoDataset(demos, **kw)  # same files: the same cache, nothing rebuilt
    assert len(dirs()) == 1
    os.utime(cached.files[-1], ns=(1, 1))  # an episode file changed: its frames may differ, a new cache
    data.DemoDataset(demos, **kw)
    assert len(dirs()) == 2


def test_records_longer_than_max_len_are_left_out_whole_and_counted(micro_data, tmp_path):
    """A record over max_len is left out, never cut (a cut answer loses its end and <|im_end|>); the count
    and the longest length are reported; the cache (whole records) is one for every max_len. The `micro`
    and `tiny` presets' max_len fits the micro data whole."""
    import train_pretrain as TP
    from common import parse_config
    root = _copy_micro(micro_data, tmp_path)
    tok = data.load_tokenizer(os.path.join(root, "tokenizer.json"))
    kw = dict(tok=tok, image_size=64, n_image_tokens=16, head_size=16)
    lengths = {r["id"]: len(data.encode_chat(tok, r["conversations"], 16)[0]) for r in data.split_records(root, "train")}
    cut = 96
    want = sorted(i for i, n in lengths.items() if n <= cut)
    assert 0 < len(want) < len(lengths)  # the micro data has records on both sides of 96 tokens
    im_end = data.special_ids(tok)["im_end_id"]
    for cache in (False, True):
        ds = data.GemDataset(root, "train", max_len=cut, cache=cache, **kw)
        assert sorted(r["id"] for r in ds.records) == want
        assert ds.too_long == (len(lengths) - len(want), max(lengths.values()))
        assert ds.skipped[f"longer than max_len={cut} tokens"] == len(lengths) - len(want)
        for i in range(len(ds)):
            it = ds[i]
            assert len(it["input_ids"]) == lengths[it["id"]]  # whole, not cut
            answer = it["labels"][it["labels"] != -100]  # (depth-only records have no answer)
            assert it["task"] == "depth" or answer[-1] == im_end  # the answer keeps its end
    data.GemDataset(root, "train", max_len=4096, cache=True, **kw)
    assert len(os.listdir(os.path.join(root, "cache"))) == 1  # max_len is not part of the cache's key
    with pytest.raises(ValueError, match="image tokens do not fit in max_len=10"):
        data.GemDataset(root, "train", max_len=10, **kw)
    for preset in ("micro", "tiny"):
        assert parse_config(TP.TrainConfig, [f"--preset={preset}"], TP.PRESETS).max_len >= max(lengths.values())


def test_caches_follow_the_code_that_fills_them(micro_data, micro_demos, tmp_path, monkeypatch):
    """Changing depth_target (a fixed bug, a solved exercise) is a new cache for the VLM data and the demo
    frames alike: the items follow the new code, never the old arrays."""
    root = _copy_micro(micro_data, tmp_path)
    tok = data.load_tokenizer(os.path.join(root, "tokenizer.json"))
    kw = dict(tok=tok, image_size=64, n_image_tokens=16, head_size=16, cache=True)
    old = data.GemDataset(root, "train", **kw)[0]["depth_target"]
    demos = str(tmp_path / "demos")
    shutil.copytree(micro_demos, demos, ignore=shutil.ignore_patterns("cache"))
    dkw = dict(tok=tok, image_size=64, horizon=8, head_size=16, n_image_tokens=16, cache=True)
    data.DemoDataset(demos, **dkw)
    real = data.depth_target

    def depth_target(depth_m, size):  # another implementation: half the real target
        return real(depth_m, size) * 0.5
    monkeypatch.setattr(data, "depth_target", depth_target)
    new = data.GemDataset(root, "train", **kw)[0]["depth_target"]
    assert torch.allclose(new, old * 0.5) and len(os.listdir(os.path.join(root, "cache"))) == 2
    data.DemoDataset(demos, **dkw)
    assert len([d for d in os.listdir(os.path.join(demos, "cache")) if d.startswith("frames-")]) == 2


def test_a_failed_cache_build_leaves_nothing_behind(micro_data, tmp_path):
    """A corrupt image stops the build with one line naming the file, and no half-built <split>-<key>.tmp-<pid>
    stays in the cache directory."""
    root = _copy_micro(micro_data, tmp_path)
    tok = data.load_tokenizer(os.path.join(root, "tokenizer.json"))
    bad = data.split_records(root, "train")[5]["_image"]
    with open(bad, "wb") as f:
        f.write(b"not a png")
    with pytest.raises(ValueError, match=os.path.basename(bad)):
        data.GemDataset(root, "train", tok=tok, image_size=64, n_image_tokens=16, head_size=16, cache=True)
    assert os.listdir(os.path.join(root, "cache")) == []
