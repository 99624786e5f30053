"""data.py: tokenizer, chat template, depth targets and PNG I/O, JSONL validation, datasets and their caches, the
demo dataset and the policy's preprocessing, on the generated micro data (fixtures in conftest.py)."""
import json
import math
import os
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
# Scene splits and datasets (the generated micro data)

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


# ----------------------------------------------------------------------------------------------------
# Demos

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
