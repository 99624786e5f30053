"""data.py: tokenizer, chat template, depth targets and PNG I/O, JSONL validation, datasets, and the
generated micro data re-checked against the simulator by independent functions (fixtures in conftest.py)."""
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
    assert small.shape == (1, 4, 4) and abs(float(small[0, 0, 0]) - float(np.mean(t[:2, :2]))) < 1e-5


def test_pixel_values_and_rgb_target():
    rgb = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3) * 5
    pv = data.pixel_values_from_rgb(rgb)
    assert pv.shape == (3, 4, 4) and torch.allclose(pv[:, 1, 2], torch.tensor(rgb[1, 2], dtype=torch.float32) / 127.5 - 1)
    assert data.pixel_values_from_rgb(np.full((2, 2, 3), 255, np.uint8)).max() == 1.0
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
    _expect_error(lambda: data.GemDataset(root, "train", tok, 32, 4, 8)[0], "0.png", "expected 32x32")
    bad = json.loads(lines[0]); bad["depth"] = "images/0.png"  # an RGB file where depth should be
    write([json.dumps(bad)])
    _expect_error(lambda: mk()[0], "0.png", "train.jsonl:1", "depth")
    _expect_error(lambda: data.GemDataset(root, "val", tok, 16, 4, 8), "val.jsonl")
