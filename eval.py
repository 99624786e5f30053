"""GEM-mini evaluation: the embodied VLM benchmark, the depth probe and closed-loop VLA success.

    python eval.py vlm --ckpt runs/tiny/gem/ckpt [--split test] [--out DIR]   # VLM questions + depth probe
    python eval.py vla --ckpt runs/tiny/vla_gem/ckpt --suite all --episodes 10 [--gif]
    python eval.py vla --ckpt expert --suite all --episodes 50               # reference rows only

Every run writes results.json, results.md and figures (PNG grid RGB | true depth | generated depth;
GIFs of rollouts) into --out (default: <ckpt>/eval_<split|vla>).

Paper -> code map
  VSI-Bench numeric answers, "mean relative accuracy"       mean_relative_accuracy
  grounding: box Acc@IoU>=0.5 / mIoU, point-in-mask         box_iou, point_in_mask (score_answer)
  yes/no, multiple choice (CV-Bench, EmbSpatial style)      parse_yesno, parse_letter -> exact match
  planning (subtask QA): per-step and whole-plan accuracy   plan_scores
  Fig. 5 "depth generated from the features"                depth_probe: sample the head (or fit one on
                                                            frozen features for sft), AbsRel / delta1 / ordinal
  LIBERO success per suite, average                         eval_vla (+ scripted-expert and random rows)
  95% intervals on every rate                               wilson
"""
from __future__ import annotations

import json
import math
import os
import re
import sys

import numpy as np

# ----------------------------------------------------------------------------------------------------
# Parsing free model text. Every parser returns None on text it cannot read: the caller counts that
# answer wrong; nothing here raises on malformed output.

_NUM = r"-?\d+(?:\.\d+)?"
_WORDS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve".split())}


def _floats(text: str) -> list[float]:
    return [float(x) for x in re.findall(_NUM, text or "")]


def parse_box(text: str):
    """'[x1, y1, x2, y2]' (0..1000 image-relative, DESIGN.md 3) -> [x1, y1, x2, y2] floats, corners sorted."""
    m = re.search(r"\[\s*(" + _NUM + r")\s*,\s*(" + _NUM + r")\s*,\s*(" + _NUM + r")\s*,\s*(" + _NUM + r")\s*\]", text or "")
    v = [float(x) for x in m.groups()] if m else _floats(text)[:4]
    if len(v) < 4:
        return None
    return [min(v[0], v[2]), min(v[1], v[3]), max(v[0], v[2]), max(v[1], v[3])]


def parse_points(text: str) -> list[tuple[float, float]]:
    """All '(x, y)' pairs in the text, in order (trajectories, point lists)."""
    return [(float(a), float(b)) for a, b in re.findall(r"\(\s*(" + _NUM + r")\s*,\s*(" + _NUM + r")\s*\)", text or "")]


def parse_point(text: str):
    pts = parse_points(text)
    if pts:
        return pts[0]
    v = _floats(text)
    return (v[0], v[1]) if len(v) >= 2 else None


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
    if pred is None or not math.isfinite(pred):
        return 0.0
    rel = abs(pred - gt) / max(abs(gt), 1e-9)
    thetas = np.arange(0.50, 0.951, 0.05)
    return float(np.mean(rel < 1.0 - thetas))


def plan_scores(pred: list[str], gt: list[str]) -> tuple[float, float]:
    """(per-step accuracy: share of reference steps matched at the same position, whole plan exactly right)."""
    gt = [_norm(s) for s in gt]
    pred = [_norm(s) for s in pred]
    per_step = sum(i < len(pred) and pred[i] == g for i, g in enumerate(gt)) / max(len(gt), 1)
    return float(per_step), float(pred == gt)


def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a rate k/n (k may be fractional, e.g. summed MRA)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def align_scale_shift(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Least-squares s, t minimising sum over valid pixels (s * pred + t - gt)^2 (MiDaS protocol); returns s*pred+t."""
    p, g = pred[valid].astype(np.float64), gt[valid].astype(np.float64)
    A = np.stack([p, np.ones_like(p)], 1)  # (N, 2)
    (s, t), *_ = np.linalg.lstsq(A, g, rcond=None)
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
