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


# ----------------------------------------------------------------------------------------------------
# Closed-loop VLA evaluation (LIBERO protocol: fixed start states, success within the task's step limit)

_WORKER = {}  # per-process policy, loaded once by _init_worker


def _init_worker(ckpt: str):
    import torch
    torch.set_num_threads(1)  # one core per worker; the pool supplies the parallelism
    _WORKER.clear()
    if ckpt not in ("expert", "random"):
        from train_vla import Policy
        _WORKER["policy"] = Policy(ckpt)
    _WORKER["ckpt"] = ckpt


def run_episode(job: tuple) -> dict:
    """One rollout from fixed start state `start_id`: (suite, task_id, start_id, keep_frames) -> outcome dict."""
    from sim_env import TabletopEnv
    suite, task_id, start_id, keep_frames = job
    kind, policy = _WORKER["ckpt"], _WORKER.get("policy")
    env = TabletopEnv(suite, task_id)
    obs, info = env.reset(options={"start_id": start_id})
    rng = np.random.default_rng([task_id, start_id, sum(suite.encode())])  # stable across processes
    if policy is not None:
        policy.reset()
    frames, steps, done = [obs["rgb"]] if keep_frames else [], 0, bool(info.get("success", False))
    while not done and steps < info["max_steps"]:
        if kind == "expert":
            action = env.expert_action()
        elif kind == "random":
            action = rng.uniform(-1, 1, 7)
        else:
            action = policy.act(obs)
        obs, _, terminated, truncated, info = env.step(np.asarray(action, np.float32))
        steps += 1
        done = bool(info["success"]) or terminated or truncated
        if keep_frames:
            frames.append(obs["rgb"])
    return {"suite": suite, "task_id": task_id, "start_id": start_id, "success": bool(info["success"]),
            "steps": steps, "subgoals_done": int(info.get("subgoals_done", 0)),
            "n_subgoals": int(info.get("n_subgoals", 0)), "task": env.task.name, "frames": frames}


def rollouts(ckpt: str, suites: list[str], episodes: int, task_ids=None, workers: int = 2, gif_dir: str = "") -> list[dict]:
    """All episodes (suite x task x start 0..episodes-1), parallel over `workers` processes."""
    from sim_env import SUITES
    from tqdm import tqdm
    jobs = [(s, t, k, bool(gif_dir) and k == 0) for s in suites for t in range(len(SUITES[s]))
            if task_ids is None or t in task_ids for k in range(episodes)]
    desc = f"rollouts {os.path.basename(os.path.normpath(ckpt))}"
    if workers <= 1:
        _init_worker(ckpt)
        out = [run_episode(j) for j in tqdm(jobs, desc=desc)]
    else:
        import multiprocessing as mp
        # spawn: a forked torch process can deadlock in its thread pool
        with mp.get_context("spawn").Pool(workers, _init_worker, (ckpt,)) as pool:
            out = list(tqdm(pool.imap(run_episode, jobs), total=len(jobs), desc=desc))
    for r in out:
        if r["frames"] and gif_dir:
            from PIL import Image
            os.makedirs(gif_dir, exist_ok=True)
            ims = [Image.fromarray(f).resize((128, 128), Image.NEAREST) for f in r["frames"]]
            ims[0].save(os.path.join(gif_dir, f"{r['suite']}_{r['task_id']:02d}_{'ok' if r['success'] else 'fail'}.gif"),
                        save_all=True, append_images=ims[1:], duration=60, loop=0)
        r.pop("frames")
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


def vla_markdown(summaries: dict[str, dict]) -> str:
    """One row per policy: success % [95% Wilson] per suite and the average; then mean subgoals on long."""
    suites = ["spatial", "object", "goal", "long"]
    lines = ["| policy | " + " | ".join(suites) + " | avg | mean subgoals on long | steps to success |",
             "|---" * 7 + "|"]
    for name, sm in summaries.items():
        ps = sm["per_suite"]
        cells = [f"{_pct(ps[s]['rate'])} [{_pct(ps[s]['lo'])}, {_pct(ps[s]['hi'])}]" if s in ps else "-" for s in suites]
        av = sm["average"]
        lg = ps.get("long", {})
        sub = f"{lg['subgoals']:.2f} / {lg['n_subgoals']:.0f}" if lg.get("subgoals") is not None else "-"
        sts = f"{av['steps_to_success']:.0f}" if av["steps_to_success"] is not None else "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_pct(av['rate'])} [{_pct(av['lo'])}, {_pct(av['hi'])}] | {sub} | {sts} |")
    return "\n".join(lines) + "\n"


def eval_vla(cfg) -> dict:
    from sim_env import SUITES
    suites = list(SUITES) if cfg.suite == "all" else cfg.suite.split(",")
    for s in suites:
        if s not in SUITES:
            raise SystemExit(f"error: --suite={s!r}: valid suites are {', '.join(SUITES)} or all")
    task_ids = [int(t) for t in cfg.tasks.split(",")] if cfg.tasks else None
    names = [cfg.ckpt] + ([r for r in ("expert", "random") if r != cfg.ckpt] if cfg.refs else [])
    results = {}
    for name in names:
        gif = os.path.join(cfg.out, "gifs", os.path.basename(os.path.normpath(name))) if cfg.gif and name == cfg.ckpt else ""
        rows = rollouts(name, suites, cfg.episodes, task_ids, cfg.workers, gif)
        label = name if name in ("expert", "random") else os.path.normpath(name)
        results[label] = {**summarise_vla(rows), "episodes": rows}
    md = (f"# VLA closed-loop success ({cfg.episodes} fixed start states per task)\n\n"
          "Success % with 95% Wilson intervals; avg = mean of the suite rates (LIBERO convention).\n\n"
          + vla_markdown(results) + "\n## Per task\n\n| policy | task | success % [95%] | steps to success |\n|---|---|---|---|\n")
    for name, sm in results.items():
        for key, t in sm["per_task"].items():
            sts = "-" if t["steps_to_success"] is None else f"{t['steps_to_success']:.0f}"
            md += f"| {name} | {key} {t['task']} | {_pct(t['rate'])} [{_pct(t['lo'])}, {_pct(t['hi'])}] | {sts} |\n"
    return write_results(cfg.out, {"kind": "vla", "ckpt": cfg.ckpt, "config": vars(cfg), "results": results}, md)


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

from dataclasses import dataclass  # noqa: E402


@dataclass
class EvalConfig:
    ckpt: str = ""              # checkpoint directory ("expert" / "random" for the vla reference rows)
    out: str = ""               # default: <ckpt>/eval_<split> or <ckpt>/eval_vla
    # vlm
    data: str = ""              # dataset root; default: the one recorded in the checkpoint's config
    split: str = "test"
    max_questions: int = 0      # 0 = every question of the split
    batch_size: int = 32
    max_new_tokens: int = 48
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
    seed: int = 0


def main(argv: list[str]) -> dict:
    from model import parse_config
    if not argv or argv[0] not in ("vlm", "vla"):
        raise SystemExit("usage: python eval.py vlm|vla --ckpt=DIR [--key=value ...]  (--help lists the flags)")
    cfg = parse_config(EvalConfig, argv[1:])
    if not cfg.ckpt:
        raise SystemExit("error: flag --ckpt is required (a checkpoint directory, or expert/random for vla)")
    if cfg.ckpt not in ("expert", "random") and not os.path.isdir(cfg.ckpt):
        raise SystemExit(f"error: --ckpt={cfg.ckpt!r}: no such checkpoint directory")
    cfg.out = cfg.out or os.path.join(cfg.ckpt if os.path.isdir(cfg.ckpt) else "out", f"eval_{cfg.split if argv[0] == 'vlm' else 'vla'}")
    return eval_vlm(cfg) if argv[0] == "vlm" else eval_vla(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
