"""One command from nothing to the paper's three tables at toy scale.

    python reproduce.py --preset=tiny --seeds=0        # ~30 min on a 2-core CPU
    python reproduce.py --preset=micro --seeds=0       # the same path in ~2 min (used by the tests)
    python reproduce.py --preset=small --seeds=0,1,2   # one GPU

Steps (each a subprocess of the owning script; a step whose `.done` marker exists is skipped, so a rerun
continues where an interrupted one stopped; an interrupted training step resumes with --resume):
  data.py (VLM data, demos) -> train_pretrain.py base (stage 0, once) -> per seed: recipes sft, gem, rgb,
  direct, regress -> train_vla.py on sft (no depth loss) and on gem (depth loss x0.1) -> eval.py vlm on every
  recipe, eval.py vla on both VLAs, plus the scripted-expert and random-policy rows -> results/<preset>/README.md

Paper -> code map: table "embodied reasoning" (SFT vs GEM) -> table 1; ablation (RGB / direct / GEM) ->
table 2; LIBERO success -> table 3 (PAPER.md "Results to mirror").
"""
from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np

from model import parse_config

HERE = os.path.dirname(os.path.abspath(__file__))
RECIPES = ["sft", "gem", "rgb", "direct", "regress"]
VLAS = {"vla_sft": ("sft", 0.0), "vla_gem": ("gem", 0.1)}  # name -> (VLM recipe, depth loss weight)


@dataclass
class ReproConfig:
    preset: str = "tiny"
    seeds: tuple[int, ...] = (0,)
    data: str = ""              # default data/<preset>
    runs: str = ""              # default runs/<preset>
    results: str = ""           # default results/<preset>
    demos_per_task: int = 20
    demo_tasks: str = "all"     # task ids per suite for demos and VLA evaluation ("all" or "0,1")
    episodes: int = 5           # fixed eval start states per task
    ref_episodes: int = 10      # for the expert / random reference rows
    vlm_eval: str = ""          # extra eval.py vlm flags, space separated
    workers: int = 2


PRESETS = {
    "micro": dict(demos_per_task=2, demo_tasks="0", episodes=1, ref_episodes=1,
                  vlm_eval="--depth_frames=4 --probe_steps=5 --sample_steps=2 --max_new_tokens=24"),
    "tiny": dict(demos_per_task=20, episodes=5, ref_episodes=10, vlm_eval="--depth_frames=32 --probe_steps=200"),
    "small": dict(demos_per_task=50, episodes=20, ref_episodes=50, vlm_eval="--depth_frames=128 --probe_steps=1000"),
}


def plan(c: ReproConfig) -> list[tuple[str, str, list[str]]]:
    """Every step as (name, output directory, argv); the order is the order of execution."""
    py, p, D, R = sys.executable, c.preset, c.data, c.runs
    demos = D + "-demos"
    tasks = [] if c.demo_tasks == "all" else [f"--tasks={c.demo_tasks}"]
    vtasks = [] if c.demo_tasks == "all" else [",".join(f"{s}:{t}" for s in ("spatial", "object", "goal", "long")
                                                        for t in c.demo_tasks.split(","))]
    steps = [("data", D, [py, "data.py", f"--out={D}", f"--preset={p}"]),
             ("demos", demos, [py, "data.py", "demos", "--suite=all", f"--per-task={c.demos_per_task}", f"--out={demos}"] + tasks),
             ("stage 0 (base VLM)", f"{R}/base", [py, "train_pretrain.py", f"--preset={p}", "--recipe=base", f"--data={D}", f"--out={R}/base"])]
    for s in c.seeds:
        S = f"{R}/seed{s}"
        for r in RECIPES:
            steps.append((f"seed {s}: recipe {r}", f"{S}/{r}", [py, "train_pretrain.py", f"--preset={p}", f"--recipe={r}",
                          f"--init={R}/base", f"--data={D}", f"--out={S}/{r}", f"--seed={s}"]))
        for v, (r, w) in VLAS.items():
            steps.append((f"seed {s}: {v}", f"{S}/{v}", [py, "train_vla.py", f"--preset={p}", f"--init={S}/{r}", f"--demos={demos}",
                          f"--out_dir={S}/{v}", f"--depth_weight={w}", f"--seed={s}"] + ([f"--tasks={vtasks[0]}"] if vtasks else [])))
        for r in RECIPES:
            steps.append((f"seed {s}: eval {r}", f"{S}/{r}/eval_test", [py, "eval.py", "vlm", f"--ckpt={S}/{r}",
                          f"--out={S}/{r}/eval_test", f"--seed={s}"] + c.vlm_eval.split()))
        for v in VLAS:
            steps.append((f"seed {s}: eval {v}", f"{S}/{v}/eval_vla", [py, "eval.py", "vla", f"--ckpt={S}/{v}/ckpt", "--refs=false",
                          f"--episodes={c.episodes}", f"--out={S}/{v}/eval_vla", f"--workers={c.workers}", f"--seed={s}"]
                          + ([f"--tasks={c.demo_tasks}"] if c.demo_tasks != "all" else []) + (["--gif"] if v == "vla_gem" else [])))
    for ref in ("expert", "random"):
        steps.append((f"reference: {ref}", f"{R}/ref_{ref}", [py, "eval.py", "vla", f"--ckpt={ref}", "--refs=false",
                      f"--episodes={c.ref_episodes}", f"--out={R}/ref_{ref}", f"--workers={c.workers}"]
                      + ([f"--tasks={c.demo_tasks}"] if c.demo_tasks != "all" else [])))
    return steps


def run_steps(c: ReproConfig) -> list[dict]:
    steps, log = plan(c), []
    t_all = time.time()
    for k, (name, out, argv) in enumerate(steps, 1):
        marker = os.path.join(out, ".done")
        head = f"[{k}/{len(steps)} {time.time() - t_all:6.0f}s] {name}"
        if os.path.isfile(marker):
            print(f"{head}: done earlier, skipped", flush=True)
            log.append(json.load(open(marker)) | {"name": name, "skipped": True})
            continue
        if argv[1].startswith("train_") and os.path.isdir(out) and any(
                d.startswith("stage") or d == "ckpt" for d in os.listdir(out)):
            argv = argv + ["--resume"]  # an interrupted training continues from its last checkpoint
        print(f"{head}: {' '.join(argv[1:])}", flush=True)
        t = time.time()
        rc = subprocess.call(argv, cwd=HERE)
        if rc != 0:
            raise SystemExit(f"error: step '{name}' failed (exit {rc}): {' '.join(argv)}")
        rec = {"name": name, "seconds": round(time.time() - t, 1), "argv": argv[1:]}
        os.makedirs(out, exist_ok=True)
        with open(marker, "w") as f:
            json.dump(rec, f)
        log.append(rec)
    return log


# ----------------------------------------------------------------------------------------------------
# Tables: every cell is (value, 95% half-width) per seed -> mean and spread over seeds

PAPER_T1 = {"sft": "60.0 / 28.9 / 72.7", "gem": "62.8 / 30.6 / 73.0", "gem − sft": "+2.8 / +1.7 / +0.3"}
PAPER_T2 = {"rgb": "80.9 / 47.5 / 62.8 / 60.0 / 44.6", "direct": "79.7 / 42.1 / 60.0 / 57.6 / 44.0",
            "gem": "81.1 / 47.8 / 65.2 / 63.0 / 48.9", "gem − rgb": "+0.2 / +0.3 / +2.4 / +3.0 / +4.3",
            "gem − direct": "+1.4 / +5.7 / +5.2 / +5.4 / +4.9"}
PAPER_T3 = {"vla_sft": "97.2 / 98.4 / 95.6 / 88.4 / 94.9", "vla_gem": "99.0 / 98.8 / 97.1 / 89.3 / 96.1",
            "vla_gem − vla_sft": "+1.8 / +0.4 / +1.5 / +0.9 / +1.2"}
# our question types standing in for the paper's benchmarks (table 2)
GROUPS = {"CV-like (relations, count)": ["rel_yn", "rel_mc", "count"], "abs. dist (distance, height)": ["distance", "height"],
          "rel. dist (closer, marked)": ["closer", "marked"], "Robo-like (place, fit)": ["place", "fit"]}


def _load(path):
    with open(path) as f:
        return json.load(f)


def _part(part, types):  # mean score of the question types present, with a Wilson half-width over their questions
    from eval import wilson
    ts = [part["per_type"][t] for t in types if t in part["per_type"]]
    if not ts:
        return None
    n, v = sum(t["n"] for t in ts), float(np.mean([t["score"] for t in ts]))
    lo, hi = wilson(v * n, n)
    return v, (hi - lo) / 2, float(np.mean([t["chance"] for t in ts]))


def vlm_cells(res: dict) -> dict:
    """One eval.py vlm results.json -> {column: (value, half-width, chance)}."""
    a, cells = res["all"], {}
    for f in ("grounding", "reasoning", "planning", "trajectory"):
        cells[f] = _part(a, a["per_family"][f]["types"]) if f in a["per_family"] else None
    cells["macro"] = _part(a, a["macro"]["types"])
    for k, name in (("heldout_template", "held-out templates"), ("heldout_combo", "held-out combos")):
        cells[name] = _part(res[k], res[k]["macro"]["types"]) if res.get(k) else None
    for g, types in GROUPS.items():
        cells[g] = _part(a, types)
    cells["reasoning (VSI-like)"] = cells["reasoning"]
    for src, name in (("probe", "probe"), ("own head", "own head")):
        m = res.get("depth", {}).get(src)
        for k in ("absrel", "delta1"):
            cells[f"{name} {'AbsRel' if k == 'absrel' else 'δ1'}"] = (m[k], 1.96 * m.get(k + "_se", 0.0), None) if m else None
    return cells


def vla_cells(sm: dict) -> dict:
    cells = {s: (v["rate"], (v["hi"] - v["lo"]) / 2, None) for s, v in sm["per_suite"].items()}
    cells["avg"] = (sm["average"]["rate"], (sm["average"]["hi"] - sm["average"]["lo"]) / 2, None)
    lg = sm["per_suite"].get("long")
    cells["subgoals on long"] = (lg["subgoals"], 0.0, None) if lg else None
    return cells


def combine(per_seed: list[dict | None]) -> dict:
    """{col: (value, half)} per seed -> {col: dict(mean, spread, half, n_seeds)}; spread = sd over seeds."""
    out = {}
    for col in per_seed[0] if per_seed and per_seed[0] else []:
        vals = [c[col] for c in per_seed if c and c.get(col) is not None]
        if not vals:
            out[col] = None
            continue
        v = np.array([x[0] for x in vals], float)
        out[col] = dict(mean=float(v.mean()), sd=float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                        half=float(np.mean([x[1] for x in vals])), n=len(v), chance=vals[0][2])
    return out


def significant(a: dict, b: dict) -> bool:
    """Several seeds: |diff| > sd_a + sd_b. One seed: |diff| > the 95% half-width of the difference."""
    d = abs(a["mean"] - b["mean"])
    return d > a["sd"] + b["sd"] if a["n"] > 1 and b["n"] > 1 else d > math.hypot(a["half"], b["half"])


def table(rows: dict[str, dict], cols: list[str], paper: dict, paper_head: str, diffs: list[tuple[str, str]],
          chance: bool = True, pct: bool = True) -> str:
    f = (lambda x: f"{100 * x:.1f}") if pct else (lambda x: f"{x:.3f}")

    def cell(c, col):
        if c is None:
            return "n/a"
        scale = 1 if col.endswith("AbsRel") or col == "subgoals on long" else 100
        g = (lambda x: f"{x:.3f}") if col.endswith("AbsRel") else (lambda x: f"{x:.2f}") if scale == 1 else f
        return f"{g(c['mean'])} ±{g(c['sd'] if c['n'] > 1 else c['half'])}"
    lines = [f"| | {' | '.join(cols)} | {paper_head} |", "|---" * (len(cols) + 2) + "|"]
    if chance:
        first = next(iter(rows.values()))
        lines.append("| chance | " + " | ".join("-" if not first.get(c) or first[c]["chance"] is None else f(first[c]["chance"])
                                               for c in cols) + " | |")
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(cell(r.get(c), c) for c in cols) + f" | {paper.get(name, '')} |")
    for a, b in diffs:
        cs = []
        for col in cols:
            x, y = rows[a].get(col), rows[b].get(col)
            if x is None or y is None:
                cs.append("n/a")
                continue
            d = x["mean"] - y["mean"]
            s = "*" if significant(x, y) else ""
            cs.append(f"{d:+.3f}{s}" if col.endswith("AbsRel") else f"{d:+.2f}{s}" if col == "subgoals on long" else f"{100 * d:+.1f}{s}")
        lines.append(f"| {a} − {b} | " + " | ".join(cs) + f" | {paper.get(f'{a} − {b}', '')} |")
    return "\n".join(lines) + "\n"


def write_readme(c: ReproConfig, log: list[dict]) -> str:
    R, S = c.runs, [f"{c.runs}/seed{s}" for s in c.seeds]
    vlm = {r: combine([vlm_cells(_load(f"{d}/{r}/eval_test/results.json")) for d in S]) for r in RECIPES}
    vla = {v: combine([vla_cells(next(iter(_load(f"{d}/{v}/eval_vla/results.json")["results"].values()))) for d in S])
           for v in VLAS}
    refs = {ref: combine([vla_cells(_load(f"{R}/ref_{ref}/results.json")["results"][ref])]) for ref in ("random", "expert")}
    t1 = ["grounding", "reasoning", "planning", "trajectory", "macro", "held-out templates", "held-out combos", "probe δ1"]
    t2 = list(GROUPS) + ["reasoning (VSI-like)", "probe AbsRel", "probe δ1", "own head δ1"]
    t3 = ["spatial", "object", "goal", "long", "avg", "subgoals on long"]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "unknown"
    import torch
    total = sum(r.get("seconds", 0) for r in log)
    os.makedirs(c.results, exist_ok=True)
    figs = []
    for r, src in (("gem", "own_head"), ("gem", "probe"), ("sft", "probe")):
        p = f"{S[0]}/{r}/eval_test/depth_{src}.png"
        if os.path.isfile(p):
            shutil.copyfile(p, f"{c.results}/depth_{r}_{src}.png")
            figs.append(f"![{r} {src}](depth_{r}_{src}.png) `{r}`, {src.replace('_', ' ')}")
    md = [f"# GEM-mini reproduction: preset `{c.preset}`, seeds {','.join(map(str, c.seeds))}\n",
          f"Command: `python reproduce.py --preset={c.preset} --seeds={','.join(map(str, c.seeds))}` · commit `{commit}` · "
          f"machine: {platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
          f"torch {torch.__version__} · summed step time {total / 60:.1f} min\n",
          "Cells: % (or AbsRel) ± the 95% interval half-width (one seed: Wilson over questions / episodes; depth: "
          "over frames) or ± the standard deviation over seeds (several seeds). Δ rows: `*` marks a significant "
          "difference: larger than the 95% half-width of the difference (one seed) or than the sum of the two "
          "spreads over seeds (several seeds). Chance: the best constant answer from the train split "
          "(VLM) and the random policy (VLA). Paper columns: the paper's numbers for the matching row.\n",
          "## 1. Embodied reasoning: the same VLM and data, with and without depth supervision\n",
          table({r: vlm[r] for r in ("sft", "gem")}, t1, PAPER_T1, "paper 2B: VSI / MMSI / EmbSpatial", [("gem", "sft")]),
          "## 2. Ablation: what kind of generative supervision, and how it is introduced\n",
          table({r: vlm[r] for r in ("sft", "direct", "rgb", "regress", "gem")}, t2, PAPER_T2,
                "paper 2B: CV / VSI-abs / VSI-rel / VSI / RoboSpatial", [("gem", "rgb"), ("gem", "direct"), ("gem", "regress")]),
          "Depth probe: a fresh head fitted on each checkpoint's frozen features for the same budget, then "
          "scale-and-shift aligned on inverse depth (AbsRel lower is better); own head: the checkpoint's "
          "depth head, where it has one.\n",
          "## 3. VLA closed-loop success (fixed start states)\n",
          table({"random": refs["random"], **vla, "expert": refs["expert"]}, t3, PAPER_T3,
                "paper LIBERO: S / O / G / L / avg", [("vla_gem", "vla_sft")], chance=False),
          f"vla_sft: VLA on the `sft` VLM, no depth loss; vla_gem: VLA on the `gem` VLM with the depth loss x0.1 (GEM-VLA). "
          f"{c.episodes} start states per task ({c.ref_episodes} for the reference rows).\n",
          "## Depth from the features (RGB | true depth | generated depth)\n", "\n\n".join(figs) + "\n",
          "## Step times\n", "| step | seconds |\n|---|---|\n" + "".join(f"| {r['name']} | {r.get('seconds', 0):.0f} |\n" for r in log)]
    text = "\n".join(md)
    with open(f"{c.results}/README.md.tmp", "w") as f:
        f.write(text)
    os.replace(f"{c.results}/README.md.tmp", f"{c.results}/README.md")
    return text


def main(argv: list[str]) -> str:
    c = parse_config(ReproConfig, argv, PRESETS)
    c.data, c.runs, c.results = (os.path.abspath(x) for x in (c.data or f"data/{c.preset}", c.runs or f"runs/{c.preset}",
                                                              c.results or f"results/{c.preset}"))
    t = time.time()
    log = run_steps(c)
    text = write_readme(c, log)
    print(text)
    print(f"reproduce: done in {time.time() - t:.0f} s -> {c.results}/README.md")
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
