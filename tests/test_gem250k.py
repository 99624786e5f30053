"""The released GEM-250K layout, read as it is (issue 14): one LLaVA-style JSONL without id / task fields,
images of any size, depth found as <depth root>/depth/<image basename>, video and multi-image records
skipped and counted, val held out from the one file; then stage 0 and the gem recipe trained on it."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data
import train_pretrain as TP
from eval import main as eval_main
from eval import score_table

SIZES = [(64, 64), (80, 48), (33, 50)]  # (width, height): three sizes and aspects


def _image(path, w, h, k):
    """Left half one colour, right half another: squashing keeps the halves apart."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = (200, 20 + 10 * k, 20)
    a[:, w // 2:] = (20, 20, 200)
    Image.fromarray(a).save(path)


def _depth(path, w, h, near=500, far=3000, hole=False):
    """16-bit millimetres: near on the left, far on the right (a nearest resize can only keep these two values)."""
    d = np.full((h, w), far, np.uint16)
    d[:, : w // 2] = near
    if hole:
        d[: h // 2, : w // 2] = 0  # invalid pixels
    Image.fromarray(d).save(path)


def write_release(root, n=14):
    """A GEM-250K.jsonl in the released layout: records 0..n-1 with one image each (sizes cycling through
    SIZES, in two source folders), depth under depth/ by basename for the even ones (half of them at another
    size than their image, one with a hole), plus one video record and one multi-image record."""
    os.makedirs(os.path.join(root, "depth"))
    lines = []
    for k in range(n):
        w, h = SIZES[k % 3]
        rel = os.path.join("src_a" if k % 2 else "src_b", f"frame_{k:03d}.jpg" if k % 4 == 3 else f"frame_{k:03d}.png")
        os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
        _image(os.path.join(root, rel), w, h, k)
        if k % 2 == 0:
            dw, dh = (w, h) if k % 4 == 0 else (2 * w, 2 * h)  # another size than the image: nearest resize
            _depth(os.path.join(root, "depth", os.path.basename(rel)), dw, dh, hole=(k == 2))
        ans = "left" if k % 2 else "right"
        lines.append({"image": rel if k % 5 else [rel],  # a list of one path is one image
                      "conversations": [{"from": "human", "value": f"<image>\nWhere is the red part of picture {k}?"},
                                        {"from": "gpt", "value": f"It is on the {ans}."}]})
    lines.insert(3, {"video": "clips/a.mp4", "conversations": [{"from": "human", "value": "<video>\nWhat happens?"},
                                                                {"from": "gpt", "value": "Nothing."}]})
    lines.insert(6, {"image": ["src_a/frame_001.png", "src_b/frame_002.png"],
                     "conversations": [{"from": "human", "value": "<image>\n<image>\nSame?"}, {"from": "gpt", "value": "No."}]})
    path = os.path.join(root, "GEM-250K.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in lines)
    return path


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return write_release(str(tmp_path_factory.mktemp("gem250k")))


@pytest.fixture(scope="module")
def tok(release, tmp_path_factory):
    texts = [t["value"] for r in data.read_jsonl(release) for t in r["conversations"]]
    return data.train_tokenizer(texts, str(tmp_path_factory.mktemp("tok") / "tokenizer.json"), 300)


def test_released_records_read_as_they_are(release, tok):
    skipped = data.Counter()
    recs = data.read_jsonl(release, depth_root=os.path.dirname(release), skipped=skipped)
    assert dict(skipped) == {"video": 1, "several images": 1} and len(recs) == 14
    assert recs[0]["id"] == "GEM-250K.jsonl:1" and recs[3]["id"] == "GEM-250K.jsonl:5"  # line numbers, video on line 4
    assert {r["task"] for r in recs} == {data.OTHER}
    has_depth = [r["_depth"] is not None for r in recs]
    assert has_depth == [k % 2 == 0 for k in range(14)]
    assert recs[2]["_depth"] == os.path.join(os.path.dirname(release), "depth", "frame_002.png")
    # our own directory layout never looks depth up by basename unless asked
    assert all(r["_depth"] is None for r in data.read_jsonl(release))
    # a bare file name, run from the data folder, finds the same depth maps
    here = os.getcwd()
    try:
        os.chdir(os.path.dirname(release))
        bare = data.split_records("GEM-250K.jsonl", "train") + data.split_records("GEM-250K.jsonl", "val")
    finally:
        os.chdir(here)
    assert sorted(r["_depth"] is not None for r in bare) == sorted(has_depth)


def test_split_of_one_file_and_items(release, tok):
    kw = dict(tok=tok, image_size=32, n_image_tokens=4, head_size=8)
    train, val = data.GemDataset(release, "train", **kw), data.GemDataset(release, "val", **kw)
    assert len(val) == 1 and len(train) == 13  # the records of every 100th image, at least one
    # by image: records that share an image share a split (records 0 and 1 below ask about one image)
    shared = [dict(l, conversations=[dict(t, value=t["value"] + " (again)") for t in l["conversations"]])
              for l in map(json.loads, open(release)) if "image" in l and isinstance(l["image"], str)]
    two = os.path.join(os.path.dirname(release), "twice.jsonl")
    with open(two, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in [json.loads(x) for x in open(release)] + shared)
    tr, va = (data.split_records(two, s) for s in ("train", "val"))
    assert va and not {r["image"] for r in tr} & {r["image"] for r in va}
    assert len(va) == 2 * len({r["image"] for r in va})  # each val image with both its records
    assert train.no_depth + val.no_depth == 7
    assert dict(train.skipped) == {"video": 1, "several images": 1}
    with pytest.raises(ValueError, match="single JSONL.*--split=val"):
        data.GemDataset(release, "test", **kw)
    for i, r in enumerate(train.records):
        it = train[i]
        img = it["image"].numpy()  # (3, 32, 32) uint8, squashed whatever the source size
        assert img.shape == (3, 32, 32)
        assert img[0, :, :12].min() > 150 and img[2, :, :12].max() < 60    # left stays red
        assert img[2, :, 20:].min() > 150 and img[0, :, 20:].max() < 60    # right stays blue
        assert it["type"] == data.OTHER and it["depth_valid"] == (r["_depth"] is not None)
        if it["depth_valid"]:  # nearest resize: only the two depths of the file, never a blend
            vals = set(np.unique(it["depth_m"].numpy()).round(3)) - {0.0}
            assert vals == {0.5, 3.0}, vals
    hole = train[[r["id"] for r in train.records].index("GEM-250K.jsonl:3")]  # record 2: a hole top-left
    assert not hole["depth_mask"][0, :4, :4].any() and hole["depth_mask"][0, 4:].all() and hole["depth_mask"][0, :, 4:].all()
    assert (hole["depth_m"][:16, :16] == 0).all()
    # the cache gives the same items as the files
    cached = data.GemDataset(release, "train", cache=True, **kw)
    for i in range(len(train)):
        a, b = train[i], cached[i]
        for k in ("image", "depth_target", "depth_mask", "input_ids", "labels", "depth_m"):
            assert torch.equal(a[k], b[k]), k


def test_depth_lookup_per_source_and_shared_basenames(tmp_path):
    root = str(tmp_path)
    path = write_release(root, n=6)
    os.makedirs(os.path.join(root, "b_depth", "depth"))
    _depth(os.path.join(root, "b_depth", "depth", "frame_001.png"), 80, 48)  # src_a/frame_001 via its own root
    recs = data.read_jsonl(path, depth_root=f"src_a=b_depth_missing,src_a/frame_001={root}/b_depth,{root}")
    by = {os.path.basename(r["image"]): r["_depth"] for r in recs}
    assert by["frame_001.png"] == f"{root}/b_depth/depth/frame_001.png"  # longest prefix wins
    assert by["frame_003.jpg"] is None and by["frame_005.png"] is None  # src_a's root has no depth/ folder
    assert by["frame_000.png"] == f"{root}/depth/frame_000.png"  # the bare root serves the rest
    # two images with one basename in different folders would share one depth map: refused, naming both
    os.makedirs(os.path.join(root, "src_c"))
    _image(os.path.join(root, "src_c", "frame_000.png"), 64, 64, 0)
    with open(path, "a") as f:
        f.write(json.dumps({"image": "src_c/frame_000.png", "conversations": [
            {"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Hello."}]}) + "\n")
    with pytest.raises(ValueError) as e:
        data.read_jsonl(path, depth_root=root)
    msg = str(e.value)
    assert "\n" not in msg and "src_b/frame_000.png" in msg and "src_c/frame_000.png" in msg and "GEM-250K.jsonl:9" in msg


def test_masked_pixels_do_not_reach_the_depth_loss():
    import depth_head as DH
    from depth_head import DepthHeadConfig, GenerativeHead
    torch.manual_seed(0)
    head = GenerativeHead(DepthHeadConfig(llm_dim=8, cond_dim=8, width=8, grid=2, out_size=8)).eval()
    h, t = torch.randn(2, 4, 8), torch.rand(2, 1, 8, 8)
    mask = torch.ones(2, 1, 8, 8, dtype=torch.bool)
    mask[0, :, :4] = False
    seeds = torch.tensor([11, 12])
    base = head.loss(h, t, mask, seeds)
    t2 = t.clone()
    t2[0, :, :4] = torch.nan  # whatever the masked pixels hold, the loss is the same
    assert torch.equal(head.loss(h, t2, mask, seeds), base)
    t3 = t.clone()
    t3[0, :, 4:] += 0.5
    assert not torch.equal(head.loss(h, t3, mask, seeds), base)
    # the reduction, written out: per sample the mean squared velocity error over its valid pixels, then
    # the mean over samples (the noise, time and velocity from the same seeded draws)
    x0 = torch.where(mask, t, 0.0) * 2 - 1  # masked targets enter as 0 (their value must not matter)
    tt, noise, _ = DH.draw_noise(x0, seeds)
    xt, v = DH.flow_pair(x0, noise, tt)
    with torch.no_grad():
        err = (head.generator(xt, tt, head.connector(h)) - v) ** 2  # (2, 1, 8, 8)
    want = (err[0, :, 4:].mean() + err[1].mean()) / 2  # sample 0: rows 4-7 valid
    assert torch.allclose(base, want, rtol=1e-5), (base, want)
    # all pixels valid: the per-pixel mask equals the per-sample flag
    assert torch.allclose(head.loss(h, t, torch.ones_like(mask), seeds), head.loss(h, t, torch.tensor([True, True]), seeds))


def test_other_family_has_its_own_row_outside_the_macro():
    rows = [dict(type="other", family="other", score=s, chance=0.0, extra={}) for s in (1.0, 0.0, 0.0)]
    rows += [dict(type="closer", family="reasoning", score=s, chance=0.5, extra={}) for s in (1.0, 1.0)]
    tab = score_table(rows)
    assert tab["per_family"]["other"]["score"] == pytest.approx(1 / 3) and tab["macro"]["score"] == 1.0
    assert score_table(rows[:3])["macro"] is None


def test_train_on_the_released_file(release, tmp_path):
    """train_pretrain.py on GEM-250K.jsonl: stage 0 (no caption family: every record), then gem, 2 steps a stage."""
    base, gem = str(tmp_path / "base"), str(tmp_path / "gem")
    TP.main(["--preset=micro", "--threads=1", "--recipe=base", f"--data={release}", f"--out={base}", "--steps0=2",
             f"--cache_dir={tmp_path / 'cache'}"])
    TP.main(["--preset=micro", "--threads=1", "--recipe=gem", f"--init={base}", f"--data={release}", f"--out={gem}",
             "--steps1=2", "--steps2=2", "--steps3=2", f"--cache_dir={tmp_path / 'cache'}"])
    msgs = [json.loads(x).get("msg", "") for x in open(os.path.join(base, "log.jsonl"))]
    assert any("trained a" in m and "tokenizer.json" in m for m in msgs), msgs
    assert any("no caption records" in m for m in msgs)
    assert any("without depth (depth loss masked): 7 train, 0 val" in m and "skipped (video): 1" in m
               and "skipped (several images): 1" in m for m in msgs), msgs
    assert not os.path.exists(os.path.join(os.path.dirname(release), "tokenizer.json"))  # nothing written beside the data
    for run in (base, gem):
        final = json.load(open(os.path.join(run, "run.json")))["final"]
        assert os.path.isfile(os.path.join(run, final, "tokenizer.json"))
    g, head, tok, tc = TP.load_pretrained(gem)
    assert head is not None and tc.data == release
    assert tok.to_str() == data.load_tokenizer(os.path.join(base, "tokenizer.json")).to_str()
    # evaluation on the held-out records: free-text answers scored by exact match in their own row, no macro
    flags = [f"--ckpt={gem}", "--depth_frames=1", "--probe_steps=2", "--sample_steps=2", "--max_new_tokens=8"]
    res = eval_main(["vlm", "--split=val", f"--out={tmp_path / 'ev'}"] + flags)
    assert res["all"]["per_type"]["other"]["n"] == 1 and res["all"]["per_type"]["other"]["metric"] == "exact"
    assert res["all"]["macro"] is None and "probe" in res["depth"]
    with pytest.raises(SystemExit, match="single JSONL.*--split=val"):
        eval_main(["vlm", f"--out={tmp_path / 'ev2'}"] + flags)
    # the data moved without its depth maps: --depth_root points eval.py at them
    import shutil
    moved = tmp_path / "moved"
    shutil.copytree(os.path.dirname(release), moved, ignore=shutil.ignore_patterns("depth", "cache"))
    ev = lambda *extra: eval_main(["vlm", "--split=val", f"--data={moved}/GEM-250K.jsonl", f"--out={tmp_path / 'ev3'}"]
                                   + list(extra) + flags)  # noqa: E731
    assert ev()["depth"] == {}  # no depth beside the moved file: nothing to probe
    assert "probe" in ev(f"--depth_root={os.path.dirname(release)}")["depth"]
