"""Does the VLM world make geometry need the image (and depth)? The three numbers issue 12 set targets for.

    python bench/world_check.py --data=data/tiny [--split=val]

1. mean-depth AbsRel: the average train depth map (each map divided by its median first), scaled to each
   held-out map's median, predicts that map with this AbsRel (whole image, valid pixels). Low = every image
   has nearly the same depth, so a depth objective teaches little. Target >= 0.10.
2. height R^2 given the text: predicting each "how tall" answer by the mean answer for the same question
   text (two-fold over train scenes) explains this share of the answers' variance. Target <= 0.5.
3. the best 2D rule per geometry type (eval.py rules: question text + 2D boxes only) next to chance.
Last line: `world_check: ROOT (SPLIT) absrel A height_r2 R`.
"""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import answer_of, load_depth_png, question_of, read_jsonl  # noqa: E402
from eval import eval_rules, parse_number  # noqa: E402


def mean_depth_absrel(root: str, split: str) -> float:
    def maps(s):
        frames = sorted({r["depth"] for r in read_jsonl(os.path.join(root, f"{s}.jsonl")) if r.get("depth")})
        return [load_depth_png(os.path.join(root, f)) for f in frames]
    train = maps("train")
    scaled = np.stack([np.where(d > 0, d / np.median(d[d > 0]), 0.0) for d in train])
    valid = np.stack([d > 0 for d in train]).sum(0)
    mean = scaled.sum(0) / np.maximum(valid, 1)  # over the maps valid at each pixel
    errs = []
    for d in maps(split):
        ok = d > 0
        pred = mean * np.median(d[ok]) / np.median(mean[ok])
        errs.append(float(np.mean(np.abs(pred[ok] - d[ok]) / d[ok])))
    return float(np.mean(errs))


def height_r2(root: str) -> float:
    """R^2 of the "how tall" answers predicted by the mean answer for the same question text, two-fold over
    the train split's scenes (a rollout's frames share one object size, so folds split by rollout; val
    holds too few height questions, ~12 in tiny, and the test split is not for choosing settings)."""
    recs = [r for r in read_jsonl(os.path.join(root, "train.jsonl")) if (r.get("meta") or {}).get("type") == "height"]
    fold = lambda r: int(r["meta"]["frame"].split("-")[1]) % 2  # frame ids are <split>-<rollout>-<t>
    y, pred = [], []
    for k in (0, 1):
        by_text = {}
        for r in recs:
            if fold(r) != k:
                by_text.setdefault(question_of(r), []).append(parse_number(answer_of(r)))
        mean = float(np.mean([v for vs in by_text.values() for v in vs]))
        for r in recs:
            if fold(r) == k:
                y.append(parse_number(answer_of(r)))
                pred.append(np.mean(by_text[question_of(r)]) if question_of(r) in by_text else mean)
    y, pred = np.array(y, float), np.array(pred, float)
    if len(y) < 4 or y.var() == 0:
        raise SystemExit(f"error: {root}/train.jsonl: {len(y)} height questions, too few (or all equal) for an R^2")
    return float(1 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum())


def main(argv):
    bad = [a for a in argv if not a.startswith("--") or "=" not in a or a[2:].split("=")[0] not in ("data", "split", "out")]
    if bad:
        raise SystemExit(f"error: {bad[0]!r}: flags are --data=DIR, --split=val|test, --out=DIR")
    kw = dict(a[2:].split("=", 1) for a in argv)
    root, split = kw.get("data", "data/tiny"), kw.get("split", "val")
    a, r2 = mean_depth_absrel(root, split), height_r2(root)

    class Cfg:  # eval_rules reads data, split, out
        data, out = root, kw.get("out", "/tmp/world_check_rules")
    Cfg.split = split
    rules = eval_rules(Cfg)["per_type"]
    print(json.dumps({t: {"rule": v["rule"], "score": round(v["score"], 3), "chance": round(v["chance"], 3)}
                      for t, v in rules.items()}, indent=1))
    print(f"world_check: {root} ({split}) absrel {a:.3f} height_r2 {r2:.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
