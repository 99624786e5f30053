"""eval.py: metrics against hand-computed cases, parsers on malformed text, the scripted-expert reference row."""
import json
import math
import os

import numpy as np
import pytest
import torch

import eval as ev


# ---- metrics vs hand computation ------------------------------------------------------------------

def test_box_iou_hand_cases():
    assert ev.box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert ev.box_iou([0, 0, 10, 10], [5, 5, 15, 15]) == pytest.approx(25 / 175)
    assert ev.box_iou([0, 0, 10, 10], [10, 10, 20, 20]) == 0.0  # touching corners
    assert ev.box_iou([0, 0, 10, 10], [0, 0, 10, 5]) == pytest.approx(0.5)
    assert ev.box_iou(None, [0, 0, 1, 1]) == 0.0
    assert ev.box_iou([3, 3, 3, 3], [3, 3, 3, 3]) == 0.0  # degenerate: no area, no credit


def test_point_in_mask_scaling_and_outside():
    mask = np.zeros((4, 8), bool)
    mask[1, 6] = True  # pixel x in [6,7), y in [1,2) -> 0..1000 units x in [750, 875), y in [250, 500)
    assert ev.point_in_mask((800, 300), mask)
    assert not ev.point_in_mask((740, 300), mask)
    assert not ev.point_in_mask((800, 200), mask)
    for pt in [(1000, 300), (-1, 300), (800, 1200), None]:  # outside the image or unreadable = miss
        assert not ev.point_in_mask(pt, mask)


def test_mean_relative_accuracy_hand_cases():
    assert ev.mean_relative_accuracy(10.0, 10.0) == 1.0
    # rel error 0.12 beats thresholds 0.50, 0.45, ..., 0.15 (8 of 10) but not 0.10 / 0.05
    assert ev.mean_relative_accuracy(11.2, 10.0) == pytest.approx(0.8)
    assert ev.mean_relative_accuracy(8.8, 10.0) == pytest.approx(0.8)
    # rel error 0.32: thresholds 0.50, 0.45, 0.40, 0.35 -> 4 of 10
    assert ev.mean_relative_accuracy(6.8, 10.0) == pytest.approx(0.4)
    assert ev.mean_relative_accuracy(30.0, 10.0) == 0.0
    assert ev.mean_relative_accuracy(None, 10.0) == 0.0
    assert ev.mean_relative_accuracy(float("nan"), 10.0) == 0.0


def test_wilson_hand_cases():
    lo, hi = ev.wilson(8, 10)  # textbook value (0.490, 0.943)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    lo, hi = ev.wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = ev.wilson(10, 10)
    assert hi == 1.0 and lo == pytest.approx(0.7225, abs=1e-4)
    assert ev.wilson(0, 0) == (0.0, 1.0)


def test_plan_scores():
    gt = ["pick up the red cube", "place it on the plate"]
    assert ev.plan_scores(ev.parse_plan("1. Pick up the red cube.\n2. Place it on the plate."), gt) == (1.0, 1.0)
    assert ev.plan_scores(ev.parse_plan("1. pick up the red cube 2. place it in the tray"), gt) == (0.5, 0.0)
    assert ev.plan_scores(ev.parse_plan("place it on the plate; pick up the red cube"), gt) == (0.0, 0.0)
    # an extra step keeps the per-step credit but the whole plan is wrong
    assert ev.plan_scores(["pick up the red cube", "place it on the plate", "wave"], gt) == (1.0, 0.0)
    assert ev.plan_scores([], gt) == (0.0, 0.0)


def test_depth_metrics_known_scale_and_shift():
    rng = np.random.default_rng(0)
    gt_inv = rng.uniform(0.5, 2.0, (16, 16))
    valid = np.ones((16, 16), bool)
    valid[0, :4] = False
    pred = (gt_inv - 0.3) / 2.5  # exactly affine: alignment must undo it
    pred[0, :4] = 99.0  # garbage on invalid pixels must not matter
    m = ev.depth_metrics(pred, gt_inv, valid)
    assert m["absrel"] == pytest.approx(0.0, abs=1e-9) and m["delta1"] == 1.0 and m["ordinal"] == 1.0
    # hand case: pred constant -> aligned to the mean of gt; gt = [1, 3] -> aligned 2 -> AbsRel (1/1 + 1/3)/2
    g = np.array([[1.0, 3.0]])
    m = ev.depth_metrics(np.zeros((1, 2)), g, np.ones((1, 2), bool))
    assert m["absrel"] == pytest.approx((1 + 1 / 3) / 2)
    assert m["delta1"] == 0.0  # 2/1 and 3/2 are both >= 1.25
    # reversed order -> ordinal 0, and no better than a flat map: the alignment may not flip the sign
    m = ev.depth_metrics(-gt_inv, gt_inv, valid)
    flat = ev.depth_metrics(np.zeros_like(gt_inv), gt_inv, valid)
    assert m["ordinal"] == 0.0 and m["absrel"] == pytest.approx(flat["absrel"]) and flat["absrel"] > 0.1


def test_ordinal_accuracy_skips_ties():
    gt = np.array([1.0, 1.0, 2.0])
    pred = np.array([5.0, 0.0, 9.0])  # the tie pair (0, 1) is ordered arbitrarily and must not count
    assert ev.ordinal_accuracy(pred, gt, np.random.default_rng(0), n_pairs=500) == 1.0
    assert math.isnan(ev.ordinal_accuracy(pred, np.ones(3), n_pairs=50))


# ---- parsers: well-formed and malformed model text ------------------------------------------------

def test_parsers_well_formed():
    assert ev.parse_box("[12, 40, 300, 512]") == [12, 40, 300, 512]
    assert ev.parse_box("the box is [300, 512, 12, 40].") == [12, 40, 300, 512]  # corners sorted
    assert ev.parse_point("(250, 700)") == (250, 700)
    assert ev.parse_points("[(1, 2), (3, 4), (5,6)]") == [(1, 2), (3, 4), (5, 6)]
    assert ev.parse_number("about 12.5 cm") == 12.5 and ev.parse_number("three") == 3
    assert ev.parse_yesno("Yes.") == "yes" and ev.parse_yesno("no, it is not") == "no"
    assert ev.parse_letter("B") == "B" and ev.parse_letter("(c) the ball") == "C"
    assert ev.parse_letter("Answer: D", 4) == "D"


@pytest.mark.parametrize("text", ["", None, "[[[", "<|im_end|>", "[1, 2, 3", "(,)", "yesterday nothing",
                                  "\x00\xff garbage", "E", "1. 2. 3.", "nan", "-" * 500, "[1e999, 2, 3, 4]"])
def test_parsers_malformed_do_not_crash_and_count_wrong(text):
    box = ev.parse_box(text)
    assert box is None or ev.box_iou(box, [100, 100, 200, 200]) < 0.5
    pt = ev.parse_point(text)
    mask = np.zeros((8, 8), bool)
    mask[1, 1] = True
    assert not ev.point_in_mask(pt, mask)
    assert ev.mean_relative_accuracy(ev.parse_number(text), 42.0) == 0.0
    assert ev.parse_yesno(text) in (None, "yes", "no")
    assert ev.parse_letter(text, 4) is None
    assert ev.plan_scores(ev.parse_plan(text), ["pick up the red cube"]) == (0.0, 0.0)


# ---- scoring free text against the dataset's answer formats ----------------------------------------

def test_score_answer_per_kind():
    from data import rle_encode
    m = np.zeros((64, 64), bool)
    m[10:20, 30:40] = True  # 0..1000 units: x in [469, 625), y in [156, 312)
    meta = {"mask_rle": rle_encode(m)}
    assert ev.score_answer("point", "(500, 200)", "(520, 250)", meta, (64, 64))[0] == 1.0
    assert ev.score_answer("point", "(700, 200)", "(520, 250)", meta, (64, 64))[0] == 0.0
    s, extra = ev.score_answer("box", "[0, 0, 10, 10]", "[5, 5, 15, 15]", {})
    assert s == 0.0 and extra["iou"] == pytest.approx(1 / 7)
    assert ev.score_answer("box", "[5, 5, 15, 14]", "[5, 5, 15, 15]", {})[0] == 1.0
    gt = "red cube [0, 0, 100, 100]; blue ball [500, 500, 600, 600]"
    assert ev.score_answer("list", gt, gt, {})[0] == 1.0
    # one of two right, one extra wrong object: F1 = 2 * 1 / (2 + 2)
    assert ev.score_answer("list", "red cube [0, 0, 100, 100]; green can [1, 1, 2, 2]", gt, {})[0] == pytest.approx(0.5)
    assert ev.score_answer("yesno", "yes", "yes", {})[0] == 1.0 and ev.score_answer("yesno", "", "yes", {})[0] == 0.0
    assert ev.score_answer("letter", "C", "C", {"choices": ["a", "b", "c"]})[0] == 1.0
    assert ev.score_answer("letter", "D", "D", {"choices": ["a", "b", "c"]})[0] == 0.0  # beyond the options
    assert ev.score_answer("letter", "B", "B", {"type": "marked"})[0] == 1.0
    assert ev.score_answer("number", "11.2", "10", {})[0] == pytest.approx(0.8)
    s, extra = ev.score_answer("plan", "pick up the cube; place it on the plate", "pick up the cube; place it in the tray", {})
    assert s == 0.5 and extra["whole_plan"] == 0.0
    # trajectory: points paired by index, hit within 100 units; a missing point is a miss
    assert ev.score_answer("trajectory", "[(0, 0), (500, 500)]", "[(50, 50), (500, 700), (9, 9)]", {})[0] == pytest.approx(1 / 3)


def test_constant_answer_is_the_prior():
    assert ev.constant_answer("number", ["1", "3", "10"]) == "3"
    assert ev.constant_answer("box", ["[0, 0, 10, 10]", "[2, 2, 20, 20]", "[4, 4, 30, 30]"]) == "[2, 2, 20, 20]"
    assert ev.constant_answer("yesno", ["yes", "no", "no"]) == "no"
    assert ev.constant_answer("trajectory", ["[(0, 0), (10, 10)]", "[(2, 2), (20, 20)]", "[(4, 4), (30, 30)]"]) == "[(2, 2), (20, 20)]"
    assert ev.constant_answer("number", []) == ""


def test_score_table_macro_and_chance():
    rows = [dict(type="rel_yn", family="reasoning", score=s, chance=0.5, extra={}) for s in (1, 1, 0, 1)]
    rows += [dict(type="box", family="grounding", score=s, chance=0.0, extra={"iou": s}) for s in (0, 1)]
    t = ev.score_table(rows)
    assert t["per_type"]["rel_yn"]["score"] == 0.75 and t["per_type"]["box"]["iou"] == 0.5
    assert t["macro"]["score"] == pytest.approx((0.75 + 0.5) / 2) and t["macro"]["chance"] == pytest.approx(0.25)
    assert t["per_family"]["reasoning"]["n"] == 4


def test_summarise_vla_rates():
    rows = [dict(suite=s, task_id=0, task="t", success=ok, steps=10, subgoals_done=1, n_subgoals=2)
            for s, ok in [("spatial", True), ("spatial", False), ("long", True), ("long", True)]]
    sm = ev.summarise_vla(rows)
    assert sm["per_suite"]["spatial"]["rate"] == 0.5 and sm["per_suite"]["long"]["rate"] == 1.0
    assert sm["average"]["rate"] == 0.75 and sm["average"]["n"] == 4
    assert sm["per_suite"]["long"]["subgoals"] == 1.0


def test_expert_reference_row_smoke():
    """The scripted expert solves >= 98% of a smoke subset of the fixed eval start states (all 4 suites)."""
    rows = ev.rollouts("expert", ["spatial", "object", "goal", "long"], episodes=2, task_ids=[0, 7], workers=2)
    sm = ev.summarise_vla(rows)
    assert len(rows) == 16 and sm["average"]["rate"] >= 0.98, [r for r in rows if not r["success"]]
    assert sm["per_suite"]["long"]["subgoals"] == sm["per_suite"]["long"]["n_subgoals"]


def test_cli_bad_input_is_one_line(tmp_path):
    for argv, needle in [(["nonsense"], "usage"), (["vlm"], "--ckpt"), (["vla", "--ckpt=/no/such/dir"], "no such"),
                         (["vla", "--ckpt=expert", "--episodez=3"], "--episodez"),
                         (["vla", "--ckpt=expert", "--suite=kitchen", f"--out={tmp_path}"], "kitchen")]:
        with pytest.raises(SystemExit) as e:
            ev.main(argv)
        assert needle in str(e.value) and "\n" not in str(e.value).strip(), str(e.value)


# ---- the 2D-rule baseline ---------------------------------------------------------------------------

def _rec(q, a, **meta):
    return {"conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}], "meta": meta}


def test_rules_fit_their_number_on_train_and_read_only_boxes_and_text():
    # closer: the answer follows "lower box bottom is nearer" (y grows downwards)
    lower = ev.rule_candidates("closer", [])["the object lower in the image is nearer"]
    assert lower(_rec("", "", obj_box=[0, 100, 10, 600], ref_box=[0, 100, 10, 400])) == "yes"
    assert lower(_rec("", "", obj_box=[0, 100, 10, 300], ref_box=[0, 100, 10, 400])) == "no"
    # height: k x box height, k the median ratio of answer to box height on train (here 0.05 cm per unit)
    train = [_rec("How tall is the red can?", str(h), obj_box=[0, 0, 10, 20 * h]) for h in (4, 6, 8, 10)]
    rules = ev.rule_candidates("height", train)
    scaled = next(fn for name, fn in rules.items() if "box height" in name)
    assert scaled(_rec("How tall is the blue cube?", "", obj_box=[0, 100, 10, 240])) == "7"  # 0.05 * 140
    by_text = rules["the train median for this question text"]
    assert by_text(_rec("How tall is the red can?", "")) == "7"  # median of 4, 6, 8, 10
    assert by_text(_rec("How tall is the green ball?", "")) == "7"  # unseen text: the overall median
    # distance: k x the distance of the box centres
    train = [_rec("How far?", str(d), obj_box=[0, 0, 10, 10], ref_box=[10 * d, 0, 10 * d + 10, 10]) for d in (5, 10, 20)]
    dist = next(fn for name, fn in ev.rule_candidates("distance", train).items() if "centres" in name)
    assert dist(_rec("", "", obj_box=[0, 0, 10, 10], ref_box=[300, 400, 310, 410])) == "50"  # 0.1 x 500
    marked = ev.rule_candidates("marked", [])["the lower mark is nearer"]
    assert marked(_rec("", "", points_px=[[5, 40], [30, 10]])) == "A" and marked(_rec("", "", points_px=[[5, 4], [30, 10]])) == "B"


def test_eval_rules_on_generated_data_scores_the_best_train_rule(micro_data, tmp_path):
    import data
    import sim_data
    # scored on train itself: micro's few test questions may hold no in-distribution `marked` one
    res = ev.main(["rules", f"--data={micro_data}", "--split=train", f"--out={tmp_path}"])
    assert set(res["per_type"]) == {"closer", "marked", "distance", "height", "fit"}
    # recomputed by hand from the stored boxes / marks: the share where "lower in the image" is "nearer"
    recs = {t: [r for r in data.read_jsonl(f"{micro_data}/train.jsonl") if r["meta"]["type"] == t] for t in ("marked", "closer")}
    hand = {"marked": np.mean([(r["meta"]["points_px"][0][1] > r["meta"]["points_px"][1][1]) == (r["meta"]["answer"] == "A")
                               for r in recs["marked"]]),
            "closer": np.mean([(r["meta"]["obj_box"][3] > r["meta"]["ref_box"][3]) == (r["meta"]["answer"] == "yes")
                               for r in recs["closer"]])}
    assert res["per_type"]["marked"]["score"] == pytest.approx(hand["marked"]) and res["per_type"]["marked"]["n"] == len(recs["marked"])
    assert res["per_type"]["closer"]["train"]["the object lower in the image is nearer"] == pytest.approx(hand["closer"])
    assert (tmp_path / "results.json").is_file() and "2D-rule baseline" in (tmp_path / "results.md").read_text()
    # on the test split only the in-distribution questions count: no held-out template, no held-out colour x
    # shape pair in the frame (read here from the stored simulator states)
    test = ev.main(["rules", f"--data={micro_data}", "--split=test", f"--out={tmp_path}/t"])

    def seen(r):
        st = json.load(open(f"{micro_data}/states/{r['meta']['frame']}.json"))["state"]
        return not r["meta"]["heldout_template"] and not {(o["colour"], o["shape"]) for o in st["objects"]} & sim_data.HELDOUT_COMBOS
    for t, v in test["per_type"].items():
        assert v["n"] == sum(seen(r) for r in data.read_jsonl(f"{micro_data}/test.jsonl") if r["meta"]["type"] == t)


@pytest.mark.parametrize("size", [32, 128])
def test_point_answers_are_scored_on_the_grid_their_mask_was_encoded_on(micro_data, tmp_path, monkeypatch, size):
    """A model whose input size differs from the data's (64 px) must score the reference answers of the point
    types (point, place, grasp: a mask per question) as right: the mask is decoded at the image file's size.
    Decoding it at the model's size scored the reference 1/6 at 32 px and 0/6 at 128."""
    import data as D
    import train_pretrain as TP
    from common import parse_config
    out, tok_path = str(tmp_path / "ckpt"), os.path.join(micro_data, "tokenizer.json")  # untrained: the answers are the oracle's
    tc = parse_config(TP.TrainConfig, ["--preset=micro", f"--data={micro_data}", f"--image_size={size}", f"--head_size={size // 4}"],
                      TP.PRESETS)
    gem = TP.build_gem(tc, D.load_tokenizer(tok_path))
    TP.save_stage(out, gem, None, tc, tok_path, 0, 0, torch.optim.AdamW(gem.parameters()), True, 0)
    monkeypatch.setattr(ev, "answer_questions", lambda gem, tok, items, *a: [it["answer"] for it in items])  # an oracle
    res = ev.main(["vlm", f"--ckpt={out}", f"--out={tmp_path / 'ev'}", "--depth_frames=0", "--image_use=0"])
    assert res["image_use"] == {}  # --image_use=0 turns the check off (it divided by zero)
    per = res["all"]["per_type"]
    points = [t for t in ("point", "place", "grasp") if t in per]
    assert points and all(per[t]["score"] == 1.0 for t in points), {t: per[t]["score"] for t in points}


def test_text_only_baseline_finds_a_planted_leak_and_nothing_else():
    """eval.text_only: where the answer follows from a word of the question (a colour here) it scores far above
    the best constant answer; where the answer is independent of the words, it stays near that constant."""
    rng = np.random.default_rng(0)
    colours = ["red", "green", "blue", "yellow"]

    def rec(k, leak):
        a, b = rng.choice(colours, 2, replace=False)
        ans = ("yes" if a in ("red", "green") else "no") if leak else str(rng.choice(["yes", "no"]))
        return {"id": f"q{k}", "meta": {"type": "closer"}, "conversations": [
            {"from": "human", "value": f"<image>\nIs the {a} cube closer to the camera than the {b} ball?"},
            {"from": "gpt", "value": ans}]}
    for leak, lo, hi in ((True, 0.95, 1.0), (False, 0.35, 0.65)):
        train, test = [rec(k, leak) for k in range(400)], [rec(1000 + k, leak) for k in range(300)]
        name, pred = ev.text_only(train, test, "yesno")
        score = np.mean([pred[r["id"]] == r["conversations"][1]["value"] for r in test])
        assert lo <= score <= hi, (leak, name, score)
    # numbers: the answer is 2 x a number named in the question; ridge regression finds it
    nums = [{"id": f"n{k}", "meta": {"type": "distance"}, "conversations": [
        {"from": "human", "value": f"<image>\nHow far is the block of size {v}?"}, {"from": "gpt", "value": str(2 * v)}]}
        for k, v in enumerate(rng.integers(1, 9, 300))]
    name, pred = ev.text_only(nums[:200], nums[200:], "number")
    assert name in ("ridge", "logistic", "lookup") and all(pred[r["id"]] == r["conversations"][1]["value"] for r in nums[200:])


def test_image_use_tells_a_model_that_sees_from_one_that_dropped_its_image(micro_data, tmp_path, monkeypatch):
    """eval.image_use on an untrained micro GEM: its image-token states differ across images (spread > 0.05).
    The same model with its ViT's output replaced by a constant (an image path that carries nothing) changes
    no answer when the image turns grey, and its spreads read 0."""
    import data as D
    import train_pretrain as TP
    from common import parse_config
    tok = D.load_tokenizer(os.path.join(micro_data, "tokenizer.json"))
    tc = parse_config(TP.TrainConfig, ["--preset=micro", f"--data={micro_data}"], TP.PRESETS)
    torch.manual_seed(0)
    gem = TP.build_gem(tc, tok).eval()
    ds = D.GemDataset(micro_data, "test", tok, 64, 16, 16)
    items = [ds[i] for i in range(len(ds)) if ds.records[i]["task"] == "reasoning"][:12]
    items.sort(key=lambda it: it["type"])
    cap = {it["type"]: 8 for it in items}
    answer = lambda its: sum((ev.answer_questions(gem, tok, [i for i in its if i["type"] == t], True, 8, 8)  # noqa: E731
                              for t in sorted({i["type"] for i in its})), [])
    seeing = ev.image_use(gem, tok, items, answer(items), True, 8, cap)
    assert seeing["vit"] > 0.05 and seeing["tokens"] > 0.05 and seeing["frames"] >= 2
    # `changed` against a hand count: an answerer that says "bright" when an image's mean pixel is over the items'
    # median changes exactly the answers that differ from the one it gives a grey image (128)
    mid = float(np.median([it["image"].float().mean() for it in items]))
    bright = lambda its: ["bright" if it["image"].float().mean() > mid else "dark" for it in its]  # noqa: E731
    monkeypatch.setattr(ev, "answer_questions", lambda gem, tok, its, *a: bright(its))
    grey = "bright" if 128 > mid else "dark"
    want = np.mean([a != grey for a in bright(items)])
    assert 0 < want < 1  # some answers change, some do not
    assert ev.image_use(gem, tok, items, bright(items), True, 8, cap)["changed"] == pytest.approx(want)
    monkeypatch.undo()
    real = gem.vit.features
    monkeypatch.setattr(gem.vit, "features", lambda px: torch.zeros_like(real(px)))
    blind = ev.image_use(gem, tok, items, answer(items), True, 8, cap)
    assert blind["changed"] == 0.0 and blind["vit"] == 0.0 and blind["tokens"] < 1e-4, blind


def test_text_only_breaks_ties_the_same_in_every_process():
    """The exact-question lookup answers a question with its most frequent train answer; a tie must not be
    broken by string hashing, which differs per process (PYTHONHASHSEED): a killed and rerun reproduction
    then wrote a different text-only row. Six answers tied on one question, in four processes."""
    import subprocess
    import sys
    code = ("import eval as ev\n"
            "ans = ['red', 'green', 'blue', 'cyan', 'pink', 'grey']\n"
            "rows = [{'id': f'q{k}', 'meta': {'type': 'closer'}, 'conversations': [{'from': 'human', 'value': '<image>\\nWhich?'},"
            " {'from': 'gpt', 'value': ans[k % 6]}]} for k in range(30)]\n"
            "print(ev.text_only(rows, rows[:1], 'exact'))\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    outs = {subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True,
                           env=dict(os.environ, PYTHONHASHSEED=str(h))).stdout for h in range(4)}
    assert len(outs) == 1, outs
