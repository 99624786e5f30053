"""GEM-mini evaluation: the embodied VLM benchmark, the depth probe and closed-loop VLA success.

    python eval.py vlm --ckpt runs/tiny/gem/ckpt [--split test] [--out DIR]   # VLM questions + depth probe
    python eval.py vla --ckpt runs/tiny/vla_gem/ckpt --suite all --episodes 10 [--gif]
    python eval.py vla --ckpt expert --suite all --episodes 50               # reference rows only
    python eval.py rules --data data/tiny --out runs/tiny/rules              # the 2D-rule baseline
    python eval.py text --data data/tiny --out runs/tiny/text                # the text-only baseline

Every run writes results.json, results.md and figures (PNG grid RGB | true depth | generated depth: depth_grid;
GIFs of rollouts) into --out (default: <ckpt>/eval_<split|vla>). Any stage checkpoint can be evaluated, so
the depth a run's head generates can be watched stage by stage (training itself logs only its losses).

Paper -> code map
  VSI-Bench numeric answers, "mean relative accuracy"       mean_relative_accuracy
  grounding: box Acc@IoU>=0.5 / mIoU, point-in-mask         box_iou, point_in_mask (score_answer)
  greedy answers through the chat template                 answer_questions (GEM.answer)
  yes/no, multiple choice (CV-Bench, EmbSpatial style)      parse_yesno, parse_letter -> exact match
  planning (subtask QA): per-step and whole-plan accuracy   plan_scores
  Fig. 5 "depth generated from the features"                depth_probe: sample the head (or fit one on
                                                            frozen features for sft), AbsRel / delta1 / ordinal
  LIBERO success per suite, average                         eval_vla (+ scripted-expert and random rows)
  95% intervals on every rate                               wilson
  (ours) what a 2D rule answers without depth                rule_candidates, eval_rules
  (ours) what the question's words alone answer              text_only, eval_text
  (ours) does the model use its image at all                 image_use (answers with a grey image, feature spread)
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys

import numpy as np
import torch
import torch.nn.functional as F

from common import parse_config, require, resolve_device
from data import IMAGE, answer_of, encode_prompt, question_of, special_ids, to_pixel_values

# ----------------------------------------------------------------------------------------------------
# Parsing free model text. Every parser returns None on text it cannot read: the caller counts that
# answer wrong; nothing here raises on malformed output.

_NUM = r"-?\d+(?:\.\d+)?"
_WORDS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve".split())}


_BOX = r"\[\s*(" + _NUM + r")\s*,\s*(" + _NUM + r")\s*,\s*(" + _NUM + r")\s*,\s*(" + _NUM + r")\s*\]"


def parse_box(text: str):
    """'[x1, y1, x2, y2]' (0..1000 image-relative, DESIGN.md 3) -> [x1, y1, x2, y2] floats, corners sorted."""
    m = re.search(_BOX, text or "")
    v = [float(x) for x in (m.groups() if m else re.findall(_NUM, text or "")[:4])]
    return [min(v[0], v[2]), min(v[1], v[3]), max(v[0], v[2]), max(v[1], v[3])] if len(v) == 4 else None


def parse_points(text: str) -> list[tuple[float, float]]:
    """All '(x, y)' pairs in the text, in order (trajectories, point lists)."""
    return [(float(a), float(b)) for a, b in re.findall(r"\(\s*(" + _NUM + r")\s*,\s*(" + _NUM + r")\s*\)", text or "")]


def parse_point(text: str):
    pts = parse_points(text) or [tuple(float(x) for x in re.findall(_NUM, text or "")[:2])]
    return pts[0] if len(pts[0]) == 2 else None


def parse_number(text: str):
    """First number in the text ('12 cm', 'about 3.5', 'three') -> float, else None."""
    m = re.search(_NUM, text or "")
    if m:
        return float(m.group())
    w = next((w for w in re.findall(r"[a-z]+", (text or "").lower()) if w in _WORDS), None)
    return float(_WORDS[w]) if w is not None else None


def parse_yesno(text: str):
    for w in re.findall(r"[a-z]+", (text or "").lower()):
        if w in ("yes", "true"):
            return "yes"
        if w in ("no", "false"):
            return "no"
    return None


def parse_letter(text: str, n_options: int = 26):
    """'B', '(B)', 'B) the cube', 'Answer: B' -> 'B'; a letter beyond the options is unreadable."""
    t = (text or "").strip()
    valid = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:n_options]
    m = (re.match(r"^\(?([A-Z])(?:[).:,\s]|$)", t) or re.match(r"^\(([a-z])\)", t)
         or re.search(r"answer\s*(?:is)?\s*:?\s*\(?([A-Z])\b", t, re.I) or re.search(r"\(([A-Z])\)", t))
    letter = m.group(1).upper() if m else None
    return letter if letter and letter in valid else None


def _norm(s: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", s.lower()))


def parse_plan(text: str) -> list[str]:
    """Numbered / newline / ';' separated steps -> normalised step strings ('1. Pick up X.' -> 'pick up x')."""
    parts = re.split(r"\n|;|(?:^|\s)\d+[.)](?:\s|$)", text or "", flags=re.M)
    return [s for s in (_norm(p) for p in parts) if s]


# ----------------------------------------------------------------------------------------------------
# Metrics (each checked against hand-computed cases in tests/test_eval.py)

def box_iou(a, b) -> float:
    """IoU of two [x1, y1, x2, y2] boxes (any common unit); a missing box scores 0."""
    if a is None or b is None:
        return 0.0
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def point_in_mask(pt, mask: np.ndarray) -> bool:
    """pt (x, y) in 0..1000 image-relative units; mask (H, W) bool. Outside the image (or None) = miss."""
    if pt is None:
        return False
    h, w = mask.shape
    x, y = pt[0] / 1000.0 * w, pt[1] / 1000.0 * h
    if not (0 <= x < w and 0 <= y < h):
        return False
    return bool(mask[int(y), int(x)])


def mean_relative_accuracy(pred, gt: float) -> float:
    """VSI-Bench MRA: mean over thresholds theta in {0.50, 0.55, ..., 0.95} of 1[|pred - gt| / |gt| < 1 - theta]."""
    # >>> exercise: mra
    if pred is None or not math.isfinite(pred):
        return 0.0
    rel = abs(pred - gt) / max(abs(gt), 1e-9)
    thetas = np.arange(0.50, 0.951, 0.05)
    return float(np.mean(rel < 1.0 - thetas))
    # <<< exercise


def plan_scores(pred: list[str], gt: list[str]) -> tuple[float, float]:
    """(per-step accuracy: share of reference steps matched at the same position, whole plan exactly right)."""
    gt = [_norm(s) for s in gt]
    pred = [_norm(s) for s in pred]
    per_step = sum(i < len(pred) and pred[i] == g for i, g in enumerate(gt)) / max(len(gt), 1)
    return float(per_step), float(pred == gt)


def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a rate k/n (k may be fractional, e.g. summed MRA)."""
    # >>> exercise: wilson
    if n == 0:
        return 0.0, 1.0
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)
    # <<< exercise


def align_scale_shift(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Least-squares s >= 0, t minimising sum over valid pixels (s * pred + t - gt)^2 (MiDaS protocol); returns s*pred+t."""
    p, g = pred[valid].astype(np.float64), gt[valid].astype(np.float64)
    A = np.stack([p, np.ones_like(p)], 1)  # (N, 2)
    (s, t), *_ = np.linalg.lstsq(A, g, rcond=None)
    if s < 0:  # a negative scale would make an inverted prediction look right: the best s >= 0 is then 0
        s, t = 0.0, g.mean()
    return s * pred + t


def depth_metrics(pred_inv: np.ndarray, gt_inv: np.ndarray, valid: np.ndarray, rng=None, n_pairs: int = 2000) -> dict:
    """Metrics on inverse depth after scale-and-shift alignment: AbsRel, delta<1.25, ordinal pair accuracy.

    pred_inv: anything affine to inverse depth (e.g. 1 - the head's sample); gt_inv: 1 / metres; valid: (H, W) bool.
    """
    valid = valid & (gt_inv > 0) & np.isfinite(gt_inv)
    al = align_scale_shift(pred_inv, gt_inv, valid)
    a, g = np.maximum(al[valid], 1e-6), gt_inv[valid]
    absrel = float(np.mean(np.abs(a - g) / g))
    delta1 = float(np.mean(np.maximum(a / g, g / a) < 1.25))
    return {"absrel": absrel, "delta1": delta1, "ordinal": ordinal_accuracy(pred_inv[valid], g, rng, n_pairs)}


def ordinal_accuracy(pred: np.ndarray, gt: np.ndarray, rng=None, n_pairs: int = 2000, min_ratio: float = 0.03) -> float:
    """Share of random pixel pairs ordered as in gt; pairs whose gt differs by < min_ratio are skipped (ties)."""
    rng = rng if rng is not None else np.random.default_rng(0)
    pred, gt = pred.ravel(), gt.ravel()
    i, j = rng.integers(0, len(gt), n_pairs), rng.integers(0, len(gt), n_pairs)
    keep = np.abs(gt[i] - gt[j]) > min_ratio * np.maximum(np.abs(gt[i]), np.abs(gt[j]))
    if not keep.any():
        return float("nan")
    return float(np.mean(np.sign(pred[i] - pred[j])[keep] == np.sign(gt[i] - gt[j])[keep]))


# ----------------------------------------------------------------------------------------------------
# VLM benchmark: one scorer per answer kind; the reference is parsed from the dataset's own answer text
# with the same parsers (so a model answering in exactly the dataset's format scores 1.0)

KIND = {"box": "box", "point": "point", "place": "point", "grasp": "point", "list": "list",
        "rel_yn": "yesno", "closer": "yesno", "fit": "yesno", "done": "yesno",
        "rel_mc": "letter", "marked": "letter", "next_step": "letter",
        "distance": "number", "height": "number", "count": "number",
        "decompose": "plan", "trajectory": "trajectory", "caption": "exact"}
METRIC = {"box": "Acc@IoU0.5", "point": "point-in-region", "list": "object F1@IoU0.5", "yesno": "exact",
          "letter": "exact", "number": "MRA", "plan": "per-step", "trajectory": "points within 0.1 image",
          "exact": "exact"}


def file_shape(path: str) -> tuple[int, int]:
    """(H, W) of an image file, from its header: the grid its record's mask_rle was encoded on."""
    from PIL import Image
    with Image.open(path) as im:
        return im.size[::-1]


def _region_hit(pt, meta: dict, gt_text: str, shape) -> bool:
    """Point types: inside the region sim_data.py stores (meta["mask_rle"]: the object's pixels, or the free
    placement area), else within 50 units (5% of the image) of the reference point."""
    if meta.get("mask_rle") is not None and shape is not None:
        from data import rle_decode
        return point_in_mask(pt, rle_decode(meta["mask_rle"], shape))
    ref = parse_point(gt_text)
    return pt is not None and ref is not None and math.dist(pt, ref) <= 50


def _named_boxes(text: str) -> list[tuple[str, list]]:  # 'red cube [1, 2, 3, 4]; plate [...]'
    return [(_norm(n), [float(v) for v in b]) for n, *b in re.findall(r"([A-Za-z][A-Za-z ]*?)\s*:?\s*" + _BOX, text or "")]


def score_answer(kind: str, pred: str, gt: str, meta: dict, shape=None) -> tuple[float, dict]:
    """(score in [0, 1], extra metrics) of a free-text prediction against the reference answer."""
    if kind == "box":
        iou = box_iou(parse_box(pred), parse_box(gt))
        return float(iou >= 0.5), {"iou": iou}
    if kind == "point":
        return float(_region_hit(parse_point(pred), meta, gt, shape)), {}
    if kind == "list":  # F1 over objects: a predicted object counts if its name matches and IoU >= 0.5
        p, g = _named_boxes(pred), _named_boxes(gt)
        used, tp = set(), 0
        for name, box in g:
            j = next((j for j, (n, b) in enumerate(p) if j not in used and n == name and box_iou(b, box) >= 0.5), None)
            if j is not None:
                used.add(j)
                tp += 1
        return (2 * tp / (len(p) + len(g)) if p or g else 1.0), {}
    if kind == "yesno":
        return float(parse_yesno(pred) is not None and parse_yesno(pred) == parse_yesno(gt)), {}
    if kind == "letter":
        n = len(meta.get("choices") or ("AB" if meta.get("type") == "marked" else "ABCD"))
        return float(parse_letter(pred, n) is not None and parse_letter(pred, n) == parse_letter(gt, n)), {}
    if kind == "number":
        ref = parse_number(gt)
        return (mean_relative_accuracy(parse_number(pred), ref) if ref is not None else 0.0), {}
    if kind == "plan":
        step, whole = plan_scores(parse_plan(pred), parse_plan(gt))
        return step, {"whole_plan": whole}
    if kind == "trajectory":  # points paired by index; a missing point is a miss
        p, g = parse_points(pred), parse_points(gt)
        hits = [i < len(p) and math.dist(p[i], q) <= 100 for i, q in enumerate(g)]
        return (float(np.mean(hits)) if g else 0.0), {}
    return float(_norm(pred) == _norm(gt)), {}


def constant_answer(kind: str, answers: list[str]) -> str:
    """Chance level = the best constant guess from the train split: the median number / box / point /
    path, else the most frequent answer text (balanced yes/no and letters give 1/n)."""
    def med(rows):
        rows = [r for r in rows if r is not None]
        return [int(round(v)) for v in np.median(np.array(rows, float), 0)] if rows else None
    if kind == "number":
        v = med([[parse_number(a)] for a in answers if parse_number(a) is not None])
        return str(v[0]) if v else ""
    if kind == "box":
        v = med([parse_box(a) for a in answers])
        return f"[{v[0]}, {v[1]}, {v[2]}, {v[3]}]" if v else ""
    if kind == "point":
        v = med([parse_point(a) for a in answers])
        return f"({v[0]}, {v[1]})" if v else ""
    if kind == "trajectory":
        n = int(np.median([len(parse_points(a)) for a in answers])) if answers else 0
        pts = [med([parse_points(a)[i] for a in answers if len(parse_points(a)) > i]) for i in range(n)]
        return "[" + ", ".join(f"({p[0]}, {p[1]})" for p in pts if p) + "]"
    vals, counts = np.unique(answers, return_counts=True) if answers else ([""], [1])
    return str(vals[int(np.argmax(counts))])


def score_table(rows: list[dict]) -> dict:
    """rows of {type, family, score, chance, extra} -> per type, per family and macro (mean over types)."""
    per_type = {}
    for t in sorted({r["type"] for r in rows}):
        rs = [r for r in rows if r["type"] == t]
        n, s = len(rs), float(np.mean([r["score"] for r in rs]))
        lo, hi = wilson(s * n, n)
        extra = {k: float(np.mean([r["extra"][k] for r in rs])) for k in rs[0]["extra"]}
        per_type[t] = {"family": rs[0]["family"], "metric": METRIC[KIND.get(t, "exact")], "n": n, "score": s,
                       "lo": lo, "hi": hi, "chance": float(np.mean([r["chance"] for r in rs])), **extra}

    def agg(types):
        n = sum(per_type[t]["n"] for t in types)
        s = float(np.mean([per_type[t]["score"] for t in types]))
        lo, hi = wilson(s * n, n)  # approximate: the macro mean treated as one rate over all n questions
        return {"n": n, "score": s, "chance": float(np.mean([per_type[t]["chance"] for t in types])), "lo": lo, "hi": hi,
                "types": list(types)}
    bench = [t for t in per_type if per_type[t]["family"] not in ("caption", "depth")]
    fams = {f: agg([t for t in bench if per_type[t]["family"] == f]) for f in sorted({per_type[t]["family"] for t in bench})}
    from data import OTHER
    macro = [t for t in bench if per_type[t]["family"] != OTHER]  # free-text records (no task): their own row only
    return {"per_type": per_type, "per_family": fams, "macro": agg(macro) if macro else None}


# ----------------------------------------------------------------------------------------------------
# The 2D-rule baseline: how much of a geometry question a rule answers that sees only the question text
# and the objects' 2D image boxes (sim_data.py stores them: meta obj_box / ref_box, marked points_px). Each
# type has a few candidate rules, their one free number fitted on train; the best on train is scored on
# the test split with the models' own scorer. A question the rule answers needs no depth.

def _bottom(b): return b[3]                                    # lower in the image = larger y
def _height(b): return max(1.0, b[3] - b[1])
def _gap(a, b): return max(1.0, math.dist(((a[0] + a[2]) / 2, (a[1] + a[3]) / 2), ((b[0] + b[2]) / 2, (b[1] + b[3]) / 2)))


def rule_candidates(typ: str, train: list[dict]) -> dict:
    """{rule name: record -> answer text} for one question type, free numbers fitted on `train`."""
    yn = lambda c: "yes" if c else "no"
    ans = [parse_number(answer_of(r)) or 0.0 for r in train]
    med = float(np.median(ans)) if ans else 0.0
    by_text = {}
    for r, a in zip(train, ans):
        by_text.setdefault(question_of(r), []).append(a)
    text_med = {q: float(np.median(v)) for q, v in by_text.items()}
    if typ == "closer":  # "is A closer to the camera than B?"
        return {"the object lower in the image is nearer": lambda r: yn(_bottom(r["meta"]["obj_box"]) > _bottom(r["meta"]["ref_box"])),
                "the taller box is nearer": lambda r: yn(_height(r["meta"]["obj_box"]) > _height(r["meta"]["ref_box"]))}
    if typ == "marked":  # "which mark is closer, A or B?"
        return {"the lower mark is nearer": lambda r: "A" if r["meta"]["points_px"][0][1] > r["meta"]["points_px"][1][1] else "B"}
    if typ == "fit":  # "would A fit on / in B?": A's box narrower than c x B's box
        w = lambda b: max(1.0, b[2] - b[0])
        def fit_rule(c): return lambda r: yn(w(r["meta"]["obj_box"]) < c * w(r["meta"]["ref_box"]))
        return {f"box width below {c:g} x the other's": fit_rule(c) for c in (0.5, 0.7, 0.9, 1.0)}
    if typ in ("distance", "height"):  # numbers: a constant, the mean for this question text, or k x pixels
        px = (lambda r: _gap(r["meta"]["obj_box"], r["meta"]["ref_box"])) if typ == "distance" else (lambda r: _height(r["meta"]["obj_box"]))
        k = float(np.median([a / px(r) for r, a in zip(train, ans)])) if train else 0.0
        return {"the train median": lambda r: str(round(med)),
                "the train median for this question text": lambda r: str(round(text_med.get(question_of(r), med))),
                f"{k:.3g} x the {'box centres distance' if typ == 'distance' else 'box height'} in 1/1000 image units":
                    lambda r: str(round(k * px(r)))}
    return {}


def eval_rules(cfg) -> dict:
    """Per geometry type: every rule's train score, and the best rule's score on the in-distribution test
    questions (training templates, seen colour x shape pairs: the models' headline part), by the models' scorer."""
    from data import read_jsonl
    recs = {s: read_jsonl(os.path.join(cfg.data, f"{s}.jsonl")) for s in ("train", cfg.split)}
    typ = lambda r: (r.get("meta") or {}).get("type")
    out, tags = {"kind": "rules", "data": cfg.data, "split": cfg.split, "per_type": {}}, {}
    for t in ("closer", "marked", "distance", "height", "fit"):
        train = [r for r in recs["train"] if typ(r) == t and ("obj_box" in r["meta"] or t == "marked")]
        test = [r for r in recs[cfg.split] if typ(r) == t and ("obj_box" in r["meta"] or t == "marked")
                and heldout_tags(dict(meta=r["meta"], question=question_of(r), answer=answer_of(r)), cfg.data, tags) == ["seen"]]
        if not train or not test:
            continue
        score = lambda fn, rs: float(np.mean([score_answer(KIND[t], fn(r), answer_of(r), r["meta"])[0] for r in rs]))
        rules = rule_candidates(t, train)
        fitted = {name: score(fn, train) for name, fn in rules.items()}
        best = max(fitted, key=fitted.get)
        s = score(rules[best], test)
        lo, hi = wilson(s * len(test), len(test))
        const = constant_answer(KIND[t], [answer_of(r) for r in train])
        out["per_type"][t] = {"rule": best, "train": fitted, "score": s, "n": len(test), "lo": lo, "hi": hi,
                              "chance": score(lambda r: const, test)}
    if not out["per_type"] and not any("obj_box" in (r.get("meta") or {}) for r in recs["train"]):
        raise SystemExit(f"error: {cfg.data}/train.jsonl: no record has meta.obj_box (data made before the 2D-rule baseline? "
                         f"regenerate it with sim_data.py)")
    md = [f"# 2D-rule baseline: {cfg.data} ({cfg.split} split)\n", "| type | best rule on train | test score | chance |", "|---|---|---|---|"]
    md += [f"| {t} | {v['rule']} | {_pct(v['score'])} [{_pct(v['lo'])}, {_pct(v['hi'])}] (n={v['n']}) | {_pct(v['chance'])} |"
           for t, v in out["per_type"].items()]
    return write_results(cfg.out, out, "\n".join(md) + "\n")


REASONING = ("closer", "marked", "distance", "height", "count", "fit", "rel_yn", "rel_mc")


def _words(q: str) -> set:
    """A question's features: its lower-case words and word pairs (the text-only baseline reads nothing else)."""
    w = re.findall(r"[a-z0-9]+", q.lower())
    return set(w) | {a + " " + b for a, b in zip(w, w[1:])}


def text_only(train: list[dict], test: list[dict], kind: str) -> tuple[str, dict]:
    """The best text-only answerer of one question type -> (its name, {record id: answer}). Candidates, each
    fitted on 4/5 of `train` and chosen by its score on the other 1/5, then refitted on all of it:
    exact-question lookup (the train answer most often given to the same question text), a word / word-pair
    logistic regression over the answers seen on train (categorical), and ridge regression on the same
    features (numbers). A question type whose answer follows from its words is found by one of them."""
    def fit(rows):
        vocab = sorted({f for r in rows for f in _words(question_of(r))})
        col = {f: j for j, f in enumerate(vocab)}

        def x(rs):  # (N, V) binary features
            m = np.zeros((len(rs), len(vocab)), np.float32)
            for i, r in enumerate(rs):
                m[i, [col[f] for f in _words(question_of(r)) if f in col]] = 1.0
            return m
        answers = [answer_of(r) for r in rows]
        const = constant_answer(kind, answers)
        by_q = {}
        for r, a in zip(rows, answers):
            by_q.setdefault(question_of(r), []).append(a)
        lookup = {q: max(sorted(set(a)), key=a.count) for q, a in by_q.items()}  # ties: the first answer in order, not by hash
        classes = sorted(set(answers))
        cls = {a: k for k, a in enumerate(classes)}
        X, y = torch.from_numpy(x(rows)), torch.tensor([cls[a] for a in answers])
        w = torch.zeros(X.shape[1], len(classes), requires_grad=True)
        b = torch.zeros(len(classes), requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=100, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(X @ w + b, y) + 1e-3 * w.pow(2).sum()
            loss.backward()
            return loss
        opt.step(closure)
        nums = [parse_number(a) for a in answers]
        ridge = None
        if kind == "number" and all(v is not None for v in nums):
            Xn = np.c_[x(rows), np.ones(len(rows), np.float32)].astype(np.float64)
            ridge = np.linalg.solve(Xn.T @ Xn + 1.0 * np.eye(Xn.shape[1]), Xn.T @ np.array(nums, np.float64))
        models = {"lookup": lambda rs: [lookup.get(question_of(r), const) for r in rs],
                  "logistic": lambda rs: [classes[k] for k in (torch.from_numpy(x(rs)) @ w.detach() + b.detach()).argmax(1).tolist()]}
        if ridge is not None:
            models["ridge"] = lambda rs: [f"{v:.2f}".rstrip("0").rstrip(".") for v in np.c_[x(rs), np.ones(len(rs))] @ ridge]
        return models

    def score(pred, rs):
        return float(np.mean([score_answer(kind, p, answer_of(r), r["meta"])[0] for p, r in zip(pred, rs)])) if rs else 0.0
    held = [r for k, r in enumerate(train) if k % 5 == 0]
    models = fit([r for k, r in enumerate(train) if k % 5]) if len(held) < len(train) else fit(train)
    best = max(models, key=lambda m: score(models[m](held), held))
    final = fit(train)[best]
    return best, dict(zip([r["id"] for r in test], final(test)))


def eval_text(cfg) -> dict:
    """The text-only baseline per reasoning type: the best answerer that reads only the question's words,
    fitted on train, scored on the in-distribution test questions (as the models are): what the text gives away."""
    from data import read_jsonl
    recs = {s: read_jsonl(os.path.join(cfg.data, f"{s}.jsonl")) for s in ("train", cfg.split)}
    typ = lambda r: (r.get("meta") or {}).get("type")  # noqa: E731
    out, tags = {"kind": "text", "data": cfg.data, "split": cfg.split, "per_type": {}}, {}
    torch.manual_seed(0)
    for t in REASONING:
        train = [r for r in recs["train"] if typ(r) == t]
        test = [r for r in recs[cfg.split] if typ(r) == t and heldout_tags(
            dict(meta=r["meta"], question=question_of(r), answer=answer_of(r)), cfg.data, tags) == ["seen"]]
        if not train or not test:
            continue
        name, pred = text_only(train, test, KIND[t])
        s = float(np.mean([score_answer(KIND[t], pred[r["id"]], answer_of(r), r["meta"])[0] for r in test]))
        const = constant_answer(KIND[t], [answer_of(r) for r in train])
        lo, hi = wilson(s * len(test), len(test))
        out["per_type"][t] = {"model": name, "score": s, "n": len(test), "lo": lo, "hi": hi,
                              "chance": float(np.mean([score_answer(KIND[t], const, answer_of(r), r["meta"])[0] for r in test]))}
    md = [f"# Text-only baseline: {cfg.data} ({cfg.split} split)\n", "| type | best text model | test score | chance |", "|---|---|---|---|"]
    md += [f"| {t} | {v['model']} | {_pct(v['score'])} [{_pct(v['lo'])}, {_pct(v['hi'])}] (n={v['n']}) | {_pct(v['chance'])} |"
           for t, v in out["per_type"].items()]
    return write_results(cfg.out, out, "\n".join(md) + "\n")


# ----------------------------------------------------------------------------------------------------
# Depth probe (paper Fig. 5: what do the features know about geometry?)

@torch.no_grad()
def image_features(gem, ds, idx: list[int], pad_id: int, bs: int = 32):
    """Frozen last-layer image-token states (N, n_img, D), depth targets (N, 1, S, S), metric depth (N, H, W),
    the target cells with depth (N, 1, S, S)."""
    from data import device_batch
    gem.eval()
    dev, hid, tgt, dm, mask = next(gem.parameters()).device, [], [], [], []
    for s in range(0, len(idx), bs):
        b = device_batch([ds[i] for i in idx[s:s + bs]], pad_id, dev)
        hid.append(gem(b["input_ids"], b["pixel_values"], attention_mask=b["attention_mask"])["image_hidden"].float())
        b = {k: b[k].cpu() for k in ("depth_target", "depth_m", "depth_mask")}
        tgt.append(b["depth_target"]), dm.append(b["depth_m"]), mask.append(b["depth_mask"])
    return torch.cat(hid), torch.cat(tgt), torch.cat(dm), torch.cat(mask)


def fit_probe(head, feats, targets, masks, steps: int, lr: float = 2e-3, bs: int = 32, seed: int = 0):
    """Train a fresh head on frozen features for a fixed budget (same for every checkpoint), on the head's device."""
    g = torch.Generator().manual_seed(seed)
    dev = next(head.parameters()).device
    feats, targets, masks = feats.to(dev), targets.to(dev), masks.to(dev)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    head.train()
    for _ in range(steps):
        i = torch.randint(0, len(feats), (min(bs, len(feats)),), generator=g).to(dev)
        loss = head.loss(feats[i], targets[i], masks[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return head.eval()


@torch.no_grad()
def depth_grid(gem, head, ds, idx, pad_id, device, path, steps: int, cfg_scale: float):
    """PNG grid, one row per item ds[i] of idx: RGB | true target | target sampled from the (eval-mode) model's
    features, the same noise for every head."""
    import torch.nn.functional as F
    from PIL import Image
    from train_pretrain import make_batch
    b = make_batch(ds, idx, pad_id, head.cfg.modality, device)
    hidden = gem(b["input_ids"], b["pixel_values"], attention_mask=b["attention_mask"])["image_hidden"]
    gen = head.sample(hidden.float(), steps=steps, cfg_scale=cfg_scale, generator=torch.Generator(device=device).manual_seed(0))
    size = max(gem.cfg.image_size, 64)
    up = lambda x: F.interpolate(x.float().clamp(0, 1), (size, size), mode="nearest").expand(-1, 3, -1, -1)  # (B, 3, size, size)
    grid = torch.cat([up((b["pixel_values"] + 1) / 2), up(b["target"]), up(gen)], -1)  # (B, 3, size, 3 size): a row per item
    grid = grid.permute(0, 2, 3, 1).reshape(-1, 3 * size, 3)  # (B size, 3 size, 3): the rows one under the other
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Image.fromarray((grid.cpu().numpy() * 255).round().astype(np.uint8)).save(path)


def distinct_frames(records: list[dict], need_depth: bool = True) -> list[int]:
    """One record index per distinct frame (with depth, if need_depth): a frame carries several questions,
    and a frame with drawn markers (its own image file beside the frame's depth map) is not a frame of its own."""
    seen, idx = set(), []
    for i, r in enumerate(records):
        d = r["_depth"]
        key = (d if os.path.basename(r["_image"]) == os.path.basename(d) else None) if d else \
            (None if need_depth else r["_image"])
        if key and key not in seen:
            seen.add(key)
            idx.append(i)
    return idx


def depth_probe(gem, head, tc, tok, cfg) -> dict:
    """Depth sampled from the checkpoint's own depth head (if it has one) and from a probe head fitted on
    frozen features with a fixed budget (every checkpoint, so recipes compare on equal terms)."""
    import torch.nn.functional as F
    from data import GemDataset
    from train_pretrain import build_head, dataset_kw
    pad = special_ids(tok)["pad_id"]
    kw = dataset_kw(tc, gem, tok, max_len=4096)

    def frames(split, n):  # one item per distinct frame with depth
        ds = GemDataset(tc.data, split, **kw)
        return ds, distinct_frames(ds.records)[:n]
    test_ds, test_idx = frames(cfg.split, cfg.depth_frames)
    train_ds, train_idx = frames("train", max(4 * cfg.depth_frames, 128))
    if not test_idx or not train_idx:
        return {}
    h_te, t_te, d_te, _ = image_features(gem, test_ds, test_idx, pad)
    S = t_te.shape[-1]
    d = d_te[:, None].float()  # (N, 1, H, W) metres
    inv = torch.where(d > 0, 1.0 / d.clamp_min(1e-6), torch.zeros_like(d))
    frac = F.interpolate((d > 0).float(), (S, S), mode="area")  # share of valid source pixels per cell
    gt_inv = (F.interpolate(inv, (S, S), mode="area") / frac.clamp_min(1e-6))[:, 0].numpy()  # (N, S, S)
    heads = {}
    if head is not None and head.cfg.modality == "depth":
        heads["own head"] = head.eval()
    torch.manual_seed(cfg.seed)
    dev = next(gem.parameters()).device
    probe = build_head(tc, gem, "gem").to(dev)
    h_tr, t_tr, _, m_tr = image_features(gem, train_ds, train_idx, pad)
    heads["probe"] = fit_probe(probe, h_tr, t_tr, m_tr, cfg.probe_steps, seed=cfg.seed)
    res = {}
    mean_map = ((t_tr.float() * m_tr).sum(0) / m_tr.sum(0).clamp(min=1))[0].numpy()  # chance: the average train
    # depth map (over the cells with depth), whatever the image
    for name, hd in [("chance", None)] + list(heads.items()):
        with torch.no_grad():
            gen = np.broadcast_to(mean_map, gt_inv.shape) if hd is None else hd.sample(
                h_te, steps=cfg.sample_steps, cfg_scale=cfg.cfg_scale, generator=torch.Generator(dev).manual_seed(cfg.seed))[:, 0].cpu().numpy()
        rng = np.random.default_rng(cfg.seed)  # the same pixel pairs for every predictor
        ms = []
        for i in range(len(gen)):  # whole image, and the foreground: pixels where this frame differs from the
            ok = frac[i, 0].numpy() > 0.999  # average scene (objects, gripper), which the average map cannot know
            fg = ok & (np.abs(t_te[i, 0].numpy() - mean_map) > 0.05)
            m = depth_metrics(1.0 - gen[i], gt_inv[i], ok, rng)
            m |= {f"fg_{k}": v for k, v in depth_metrics(1.0 - gen[i], gt_inv[i], fg, rng).items()} if fg.sum() >= 8 else {}
            ms.append(m)
        res[name] = {"frames": len(gen)}
        for k in ms[0] | next((m for m in ms if "fg_absrel" in m), {}):  # mean over frames and its standard error
            v = np.array([m.get(k, np.nan) for m in ms], float)
            res[name] |= {k: float(np.nanmean(v)), k + "_se": float(np.nanstd(v) / math.sqrt(max(1, np.isfinite(v).sum())))}
        if hd is not None:
            depth_grid(gem, hd, test_ds, test_idx[:4], pad, dev, os.path.join(cfg.out, f"depth_{name.replace(' ', '_')}.png"),
                       cfg.sample_steps, cfg.cfg_scale)
    res["note"] = f"probe: fresh {tc.head_size}x{tc.head_size} head fitted {cfg.probe_steps} steps on {len(train_idx)} frozen train frames"
    return res


def answer_questions(gem, tok, items: list[dict], image_first: bool, batch_size: int, max_new_tokens: int) -> list[str]:
    """Greedy answers (text) to dataset items' questions, through the chat template and GEM.answer."""
    if not items:
        return []
    prompts = [encode_prompt(tok, IMAGE + "\n" + it["question"], gem.cfg.n_image_tokens, image_first) for it in items]
    pixels = to_pixel_values(torch.stack([it["image"] for it in items]))
    ids = gem.answer(prompts, pixels, max_new_tokens, special_ids(tok)["im_end_id"], batch_size)
    return [tok.decode(g, skip_special_tokens=True).strip() for g in ids]


@torch.no_grad()
def image_use(gem, tok, items: list[dict], preds: list[str], image_first: bool, batch_size: int, cap: dict) -> dict:
    """Does the model use its image? (A falling loss can mean a dropped image.) `changed`: the share of
    answers (`preds`, given each item's own image) that change when every image is one grey image; `vit` and
    `tokens`: the spread across images of the ViT features and of the LLM's last-layer image-token states
    (their std over images, averaged over positions and channels), each over its overall spread. A model that
    dropped its image changes no answer, and its states are the same for every image (spread ~0)."""
    grey = [dict(it, image=torch.full_like(it["image"], 128)) for it in items]
    blind = []
    for t in sorted({it["type"] for it in items}):  # in the order eval_vlm answered them: sorted by type
        blind += answer_questions(gem, tok, [g for g in grey if g["type"] == t], image_first, batch_size, cap.get(t, 32))
    frames = list({it["meta"].get("frame", it["id"]): it for it in items}.values())[:64]  # distinct images
    dev = next(gem.parameters()).device
    pix = to_pixel_values(torch.stack([it["image"] for it in frames])).to(dev)
    vit = gem.vit.features(pix).float()  # (N, P, Dv)
    ids = torch.tensor([encode_prompt(tok, IMAGE + "\n" + frames[0]["question"], gem.cfg.n_image_tokens, image_first)],
                       device=dev).repeat(len(frames), 1)  # one question for every image: only the image differs
    tokens = gem(ids, pix)["image_hidden"].float()  # (N, n_image_tokens, D)
    spread = lambda x: float(x.std(0).mean() / x.std().clamp(min=1e-12)) if len(x) > 1 else None  # one image: none  # noqa: E731
    return dict(n=len(items), changed=float(np.mean([a != b for a, b in zip(preds, blind)])) if items else 0.0,
                frames=len(frames), vit=spread(vit), tokens=spread(tokens))  # spreads: None with one image


def eval_vlm(cfg) -> dict:
    from data import GemDataset, split_records
    from train_pretrain import dataset_kw, load_pretrained
    from tqdm import tqdm
    torch.set_num_threads(max(1, cfg.threads))
    gem, head, tok, tc = load_pretrained(cfg.ckpt)
    dev = resolve_device(cfg.device)
    gem, head = gem.to(dev), head.to(dev) if head is not None else None
    tc.data, tc.image_root, tc.depth_root = cfg.data or tc.data, cfg.image_root or tc.image_root, cfg.depth_root or tc.depth_root
    gem.eval()
    kw = dataset_kw(tc, gem, tok, max_len=4096)
    test = GemDataset(tc.data, cfg.split, **kw)
    train_recs = split_records(tc.data, "train", tc.image_root, tc.depth_root)  # the answers only
    keep = [i for i in range(len(test)) if test.records[i]["task"] not in ("depth", "caption")]  # not benchmark questions
    items = [test[i] for i in keep]
    mask_shape = {test.records[i]["id"]: file_shape(test.records[i]["_image"]) for i in keep
                  if (test.records[i].get("meta") or {}).get("mask_rle") is not None}
    if cfg.max_questions:
        items = items[::max(1, len(items) // cfg.max_questions)][:cfg.max_questions]  # spread over types
    answers_by_type = {}
    for r in train_recs:
        t = (r.get("meta") or {}).get("type", r["task"])
        answers_by_type.setdefault(t, []).append(next((c["value"] for c in r["conversations"] if c["from"] == "gpt"), ""))
    const = {t: constant_answer(KIND.get(t, "exact"), a) for t, a in answers_by_type.items()}
    # per-type answer budget: the longest train answer of the type + 8 tokens (digits are single tokens)
    cap = {t: min(cfg.max_new_tokens, 8 + max(len(tok.encode(a).ids) for a in ans)) for t, ans in answers_by_type.items()}
    items.sort(key=lambda it: it["type"])  # batches of one type stop together
    preds, bar = [], tqdm(total=len(items), desc="answering")
    for t in sorted({it["type"] for it in items}):
        group = [it for it in items if it["type"] == t]
        preds += answer_questions(gem, tok, group, tc.image_first, cfg.batch_size, cap.get(t, cfg.max_new_tokens))
        bar.update(len(group))
    bar.close()
    rows, scenes = [], {}
    for it, p in zip(items, preds):
        kind = KIND.get(it["type"], "exact")
        shape = mask_shape.get(it["id"])  # the size its mask was encoded at: the image file's, not the model's input
        sc, extra = score_answer(kind, p, it["answer"], it["meta"], shape)
        ch, _ = score_answer(kind, const.get(it["type"], ""), it["answer"], it["meta"], shape)
        rows.append({"id": it["id"], "type": it["type"], "family": it["task"], "score": sc, "chance": ch,
                     "extra": extra, "pred": p, "answer": it["answer"], "tags": heldout_tags(it, tc.data, scenes)})
    res = {"kind": "vlm", "ckpt": cfg.ckpt, "split": cfg.split, "config": vars(cfg), "all": score_table(rows)}
    for tag in ("seen", "heldout_template", "heldout_combo"):
        sub = [r for r in rows if tag in r["tags"]]
        res[tag] = score_table(sub) if sub else None
    seen = [k for k, r in enumerate(rows) if "seen" in r["tags"]][::max(1, len(rows) // max(cfg.image_use, 1))][:cfg.image_use]
    res["image_use"] = image_use(gem, tok, [items[k] for k in seen], [preds[k] for k in seen], tc.image_first,
                                 cfg.batch_size, cap) if cfg.image_use and seen else {}
    res["depth"] = depth_probe(gem, head, tc, tok, cfg) if cfg.depth_frames else {}
    res["answers"] = rows
    return write_results(cfg.out, res, vlm_markdown(res))


def heldout_tags(item: dict, root: str, cache: dict) -> list[str]:
    """Test-split parts: a held-out question template (meta flag); a held-out colour x shape combination
    (sim_data.HELDOUT_COMBOS, never in train/val) in the scene (states/<frame>.json) or named in the text; else "seen"."""
    from sim_data import HELDOUT_COMBOS
    frame = item["meta"].get("frame")
    if frame not in cache:
        path = os.path.join(root, "states", f"{frame}.json")
        objs = json.load(open(path))["state"].get("objects", []) if frame and os.path.isfile(path) else []
        cache[frame] = any((o.get("colour"), o.get("shape")) in HELDOUT_COMBOS for o in objs)
    text = (item["question"] + " " + item["answer"]).lower()
    tags = ["heldout_template"] if item["meta"].get("heldout_template") else []
    tags += ["heldout_combo"] if cache[frame] or any(f"{c} {s}" in text for c, s in HELDOUT_COMBOS) else []
    return tags or ["seen"]


def vlm_markdown(res: dict) -> str:
    cols = [k for k in ("all", "seen", "heldout_template", "heldout_combo") if res.get(k)]
    md = [f"# VLM benchmark: {res['ckpt']} ({res['split']} split)\n",
          "score % [95% Wilson] (chance = best constant answer from the train split)\n",
          "| type | family | metric | " + " | ".join(cols) + " | chance |", "|---" * (len(cols) + 4) + "|"]
    rows = [(t, v["family"], v["metric"], ("per_type", t)) for t, v in res["all"]["per_type"].items()]
    rows += [(f"**{f}**", "family", "mean of types", ("per_family", f)) for f in res["all"]["per_family"]]
    macro = [("**macro**", "all", "mean of types (not other)", ("macro", None))] if res["all"]["macro"] else []
    for name, fam, metric, (part, key) in rows + macro:
        cells = [res[c][part] if key is None else res[c][part].get(key) for c in cols]
        md.append(f"| {name} | {fam} | {metric} | " + " | ".join("-" if c is None else
                  f"{_pct(c['score'])} [{_pct(c['lo'])}, {_pct(c['hi'])}] (n={c['n']})" for c in cells) + f" | {_pct(cells[0]['chance'])} |")
    if res.get("image_use"):
        u = res["image_use"]
        md.append(f"\nImage use ({u['n']} in-distribution questions, {u['frames']} images): {_pct(u['changed'])}% of the "
                  "answers change when the image is grey; spread across images / overall: ViT features "
                  + ", image-token states ".join("n/a" if u[k] is None else f"{u[k]:.3f}" for k in ("vit", "tokens"))
                  + " (~0: the model dropped its image)")
    for name, m in res["depth"].items():
        if isinstance(m, dict):
            md.append(f"\nDepth ({name}, {m['frames']} frames): AbsRel {m['absrel']:.3f}, delta<1.25 {_pct(m['delta1'])}%, "
                      f"ordinal {_pct(m['ordinal'])}%; foreground: AbsRel {m.get('fg_absrel', float('nan')):.3f}, "
                      f"delta<1.25 {_pct(m.get('fg_delta1'))}%, ordinal {_pct(m.get('fg_ordinal'))}% (inverse depth, scale-and-shift aligned)")
    if res["depth"].get("note"):
        md.append(f"\n{res['depth']['note']}; figures depth_*.png: RGB | true depth | generated depth")
    return "\n".join(md) + "\n"


# ----------------------------------------------------------------------------------------------------
# Closed-loop VLA evaluation (LIBERO protocol: fixed start states, success within the task's step limit)

_WORKER = {}  # per-process policy, loaded once by _init_worker


def _init_worker(ckpt: str, seed: int = 0, device: str = "cpu"):
    torch.set_num_threads(1)  # one core per worker; the pool supplies the parallelism
    _WORKER.clear()
    _WORKER.update(ckpt=ckpt, seed=seed, device=device)


def _policy():
    """The worker's policy, loaded on first use (an error then fails the job instead of respawning workers)."""
    if _WORKER["ckpt"] not in ("expert", "random") and "policy" not in _WORKER:
        from train_vla import Policy
        ck = _WORKER["ckpt"]  # a run directory or its ckpt/
        _WORKER["policy"] = Policy(os.path.join(ck, "ckpt") if os.path.isdir(os.path.join(ck, "ckpt")) else ck,
                                   device=_WORKER["device"], seed=_WORKER["seed"])
    return _WORKER.get("policy")


def run_episodes(job: tuple) -> list[dict]:
    """Rollouts of one task from fixed start states, in lockstep so the policy answers them in one batch:
    (suite, task_id, start_ids, keep_frames) -> one outcome dict per start state."""
    from sim_env import TabletopEnv
    suite, task_id, starts, keep_frames = job
    kind, policy = _WORKER["ckpt"], _policy()
    size = policy.model.vlm.cfg.image_size if policy is not None else 64
    envs = [TabletopEnv(suite, task_id, image_size=size) for _ in starts]
    obs, infos = map(list, zip(*[e.reset(options={"start_id": k}) for e, k in zip(envs, starts)]))
    rngs = [np.random.default_rng([task_id, k, sum(suite.encode())]) for k in starts]  # stable across processes
    steps, done = [0] * len(envs), [bool(i.get("success")) for i in infos]
    frames = [[o["rgb"]] if keep_frames and j == 0 else None for j, o in enumerate(obs)]
    if policy is not None:  # the flow noise is seeded per job (one task's start states), so the results do not
        policy.reset(len(envs))  # depend on which worker ran the job or what it ran before
        policy.generator.manual_seed(int(np.random.default_rng([_WORKER["seed"], task_id, sum(suite.encode()), *starts])
                                         .integers(2 ** 62)))
    while not all(done):
        live = [None if d else o for o, d in zip(obs, done)]
        if kind == "expert":
            acts = [None if d else e.expert_action() for e, d in zip(envs, done)]
        elif kind == "random":
            acts = [None if d else g.uniform(-1, 1, 7) for g, d in zip(rngs, done)]
        else:
            acts = policy.act_batch(live)
        for j, (e, a) in enumerate(zip(envs, acts)):
            if done[j]:
                continue
            obs[j], _, term, trunc, infos[j] = e.step(np.asarray(a, np.float32))
            steps[j] += 1
            done[j] = bool(infos[j]["success"]) or term or trunc or steps[j] >= infos[j]["max_steps"]
            if frames[j] is not None:
                frames[j].append(obs[j]["rgb"])
    return [{"suite": suite, "task_id": task_id, "start_id": k, "success": bool(i["success"]), "steps": n,
             "subgoals_done": int(i.get("subgoals_done", 0)), "n_subgoals": int(i.get("n_subgoals", 0)),
             "task": e.task.name, "final_state": [round(float(x), 6) for x in o["state"]], "frames": f}
            for k, i, n, e, f, o in zip(starts, infos, steps, envs, frames, obs)]


def rollouts(ckpt: str, suites: list[str], episodes: int, task_ids=None, workers: int = 2, gif_dir: str = "",
             strip: str = "", seed: int = 0, device: str = "cpu") -> list[dict]:
    """All episodes (suite x task x start 0..episodes-1); one job per task, jobs spread over `workers` processes
    (each with its own policy on `device`: a GPU answers every worker's batches).
    gif_dir: a GIF of start state 0 of every task; strip: a PNG, one row of 6 frames per suite (first task)."""
    from PIL import Image
    from sim_env import SUITES
    from tqdm import tqdm
    tasks = [(s, t) for s in suites for t in range(len(SUITES[s])) if task_ids is None or t in task_ids]
    firsts = {s: min(t for s2, t in tasks if s2 == s) for s in suites}
    jobs = [(s, t, list(range(episodes)), bool(gif_dir) or (bool(strip) and t == firsts[s])) for s, t in tasks]
    desc = f"rollouts {os.path.basename(os.path.normpath(ckpt))}"
    if workers <= 1 or len(jobs) == 1:
        _init_worker(ckpt, seed, device)
        out = [r for j in tqdm(jobs, desc=desc) for r in run_episodes(j)]
    else:
        import multiprocessing as mp
        # spawn: a forked torch process can deadlock in its thread pool
        with mp.get_context("spawn").Pool(workers, _init_worker, (ckpt, seed, device)) as pool:
            out = [r for rs in tqdm(pool.imap(run_episodes, jobs), total=len(jobs), desc=desc) for r in rs]
    rows = []
    for r in out:
        fr = r.pop("frames")
        if fr and gif_dir:
            os.makedirs(gif_dir, exist_ok=True)
            ims = [Image.fromarray(f).resize((128, 128), Image.NEAREST) for f in fr]
            ims[0].save(os.path.join(gif_dir, f"{r['suite']}_{r['task_id']:02d}_{'ok' if r['success'] else 'fail'}.gif"),
                        save_all=True, append_images=ims[1:], duration=60, loop=0)
        if fr and strip and r["task_id"] == firsts[r["suite"]]:
            rows.append(np.concatenate([fr[i] for i in np.linspace(0, len(fr) - 1, 6).round().astype(int)], 1))
    if rows:
        os.makedirs(os.path.dirname(strip) or ".", exist_ok=True)
        Image.fromarray(np.concatenate(rows, 0)).save(strip)
    return out


def _rate(rows: list[dict]) -> dict:
    n, k = len(rows), sum(r["success"] for r in rows)
    lo, hi = wilson(k, n)
    steps = [r["steps"] for r in rows if r["success"]]
    return {"n": n, "successes": k, "rate": k / max(n, 1), "lo": lo, "hi": hi,
            "steps_to_success": float(np.mean(steps)) if steps else None,
            "subgoals": float(np.mean([r["subgoals_done"] for r in rows])) if rows else None,
            "n_subgoals": float(np.mean([r["n_subgoals"] for r in rows])) if rows else None}


def summarise_vla(rows: list[dict]) -> dict:
    """Per task, per suite, and the 4-suite average (mean of suite rates, the LIBERO convention)."""
    tasks = {}
    for r in rows:
        tasks.setdefault(f"{r['suite']}/{r['task_id']}", []).append(r)
    per_task = {k: {"task": v[0]["task"], **_rate(v)} for k, v in tasks.items()}
    suites = sorted({r["suite"] for r in rows}, key=["spatial", "object", "goal", "long"].index)
    per_suite = {s: _rate([r for r in rows if r["suite"] == s]) for s in suites}
    pooled = _rate(rows)
    avg = {**pooled, "rate": float(np.mean([per_suite[s]["rate"] for s in suites])) if suites else 0.0}
    return {"per_task": per_task, "per_suite": per_suite, "average": avg}


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _ci(d: dict) -> str:
    return f"{_pct(d['rate'])} [{_pct(d['lo'])}, {_pct(d['hi'])}]"


def eval_vla(cfg) -> dict:
    from sim_env import SUITES
    suites = list(SUITES) if cfg.suite == "all" else cfg.suite.split(",")
    if any(s not in SUITES for s in suites):
        raise SystemExit(f"error: --suite={cfg.suite!r}: valid suites are {', '.join(SUITES)} or all")
    task_ids = [int(t) for t in cfg.tasks.split(",")] if cfg.tasks else None
    results = {}
    for name in [cfg.ckpt] + ([r for r in ("expert", "random") if r != cfg.ckpt] if cfg.refs else []):
        ref = name in ("expert", "random")
        gif = os.path.join(cfg.out, "gifs") if cfg.gif and name == cfg.ckpt else ""
        rows = rollouts(name, suites, cfg.episodes, task_ids, cfg.workers, gif,
                        os.path.join(cfg.out, f"rollouts_{name if ref else 'policy'}.png"), cfg.seed, str(resolve_device(cfg.device)))
        results[name if ref else os.path.normpath(name)] = {**summarise_vla(rows), "episodes": rows}
    md = [f"# VLA closed-loop success ({cfg.episodes} fixed start states per task)\n",
          "Success % [95% Wilson]; avg = mean of the suite rates (LIBERO convention).\n",
          "| policy | " + " | ".join(suites) + " | avg | mean subgoals on long | steps to success |", "|---" * (len(suites) + 4) + "|"]
    for name, sm in results.items():
        ps, av, lg = sm["per_suite"], sm["average"], sm["per_suite"].get("long", {})
        sub = f"{lg['subgoals']:.2f} / {lg['n_subgoals']:.0f}" if lg.get("subgoals") is not None else "-"
        sts = "-" if av["steps_to_success"] is None else f"{av['steps_to_success']:.0f}"
        md.append(f"| {name} | " + " | ".join(_ci(ps[s]) for s in suites) + f" | {_ci(av)} | {sub} | {sts} |")
    md += ["\n## Per task\n", "| policy | task | success % [95%] | steps to success |", "|---|---|---|---|"]
    md += [f"| {name} | {key} {t['task']} | {_ci(t)} | {'-' if t['steps_to_success'] is None else round(t['steps_to_success'])} |"
           for name, sm in results.items() for key, t in sm["per_task"].items()]
    return write_results(cfg.out, {"kind": "vla", "ckpt": cfg.ckpt, "config": vars(cfg), "results": results}, "\n".join(md) + "\n")


def write_results(out: str, results: dict, md: str) -> dict:
    """results.json (everything, machine-readable) + results.md (the tables), written atomically."""
    os.makedirs(out, exist_ok=True)
    for name, text in (("results.json", json.dumps(results, indent=1, default=float)), ("results.md", md)):
        tmp = os.path.join(out, name + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out, name))
    print(md)
    print(f"wrote {out}/results.json and results.md")
    return results


# ----------------------------------------------------------------------------------------------------
# CLI

@dataclasses.dataclass
class EvalConfig:
    ckpt: str = ""              # checkpoint directory ("expert" / "random" for the vla reference rows)
    out: str = ""               # default: <ckpt>/eval_<split> or <ckpt>/eval_vla
    # vlm
    data: str = ""              # data directory or released-layout JSONL; default: the checkpoint's
    image_root: str = ""        # with --data elsewhere: where its images are ("" = the checkpoint's setting)
    depth_root: str = ""        # with --data elsewhere: its depth roots, as train_pretrain.py --depth_root
    split: str = "test"
    max_questions: int = 0      # 0 = every question of the split
    batch_size: int = 32
    max_new_tokens: int = 200     # hard cap; each type gets its longest train answer + 8
    image_use: int = 256        # in-distribution questions answered again with grey images (image_use; 0 = skip)
    depth_frames: int = 32      # held-out frames for the depth probe (0 = skip the probe)
    probe_steps: int = 200      # budget to fit a head on frozen features (checkpoints without one)
    sample_steps: int = 30      # Euler steps of the depth head (paper: 30, CFG 5.0)
    cfg_scale: float = 5.0
    # vla
    suite: str = "all"
    episodes: int = 10          # fixed start states per task (LIBERO: 50)
    tasks: str = ""             # comma-separated task ids (default: all 10 of each suite)
    workers: int = 2
    gif: bool = False
    refs: bool = True           # add the scripted-expert and random-policy reference rows
    threads: int = 1            # torch threads for vlm (1 avoids thread thrash on a shared 2-core CPU)
    device: str = "auto"        # auto (the GPU when there is one) | cpu | cuda; rollout workers each load the policy there
    seed: int = 0


def main(argv: list[str]) -> dict:
    if not argv or argv[0] not in ("vlm", "vla", "rules", "text"):
        raise SystemExit("usage: python eval.py vlm|vla --ckpt=DIR [--key=value ...] | python eval.py rules|text --data=DIR --out=DIR"
                         "  (--help lists the flags)")
    cfg = parse_config(EvalConfig, argv[1:])
    require(cfg, max_questions=0, image_use=0, batch_size=1, max_new_tokens=1, depth_frames=0, probe_steps=0, sample_steps=1, episodes=1,
            workers=1, threads=1)
    if argv[0] in ("rules", "text"):
        if not cfg.data or not cfg.out:
            raise SystemExit(f"error: eval.py {argv[0]} needs --data (a dataset root) and --out")
        return eval_rules(cfg) if argv[0] == "rules" else eval_text(cfg)
    if not cfg.ckpt:
        raise SystemExit("error: flag --ckpt is required (a checkpoint directory, or expert/random for vla)")
    if cfg.ckpt not in ("expert", "random") and not os.path.isdir(cfg.ckpt):
        raise SystemExit(f"error: --ckpt={cfg.ckpt!r}: no such checkpoint directory")
    cfg.out = cfg.out or os.path.join(cfg.ckpt if os.path.isdir(cfg.ckpt) else "out", f"eval_{cfg.split if argv[0] == 'vlm' else 'vla'}")
    if argv[0] == "vla":
        return eval_vla(cfg)
    try:
        return eval_vlm(cfg)
    except (ValueError, FileNotFoundError) as e:  # bad data or checkpoint files: one line naming the file
        raise SystemExit(f"error: {str(e).strip(chr(39))}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
