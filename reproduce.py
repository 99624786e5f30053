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
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np

from common import parse_config

HERE = os.path.dirname(os.path.abspath(__file__))
SUITES = ("spatial", "object", "goal", "long")
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
    vla_suites: str = "all"     # suites for demos, VLA training and VLA evaluation ("all" or e.g. "goal")
    episodes: int = 5           # fixed eval start states per task
    ref_episodes: int = 10      # for the expert / random reference rows
    vlm_eval: str = ""          # extra eval.py vlm flags, space separated
    pretrain_flags: str = ""    # extra train_pretrain.py flags for every recipe, e.g. "--steps3=100"
    vla_flags: str = ""         # extra train_vla.py flags
    data_flags: str = ""        # extra data.py flags (VLM data)
    workers: int = 2            # processes for VLA rollouts
    jobs: int = 2               # steps run at once
    threads: int = 1            # torch threads per training step


PRESETS = {
    "micro": dict(demos_per_task=2, demo_tasks="0", episodes=1, ref_episodes=1, workers=1, data_flags="--test_rollouts=8",
                  vlm_eval="--depth_frames=4 --probe_steps=5 --sample_steps=2 --max_new_tokens=24"),
    # tiny fits ~30 min on 2 cores: stages 0-2 get 2/3 to 1/2 of train_pretrain.py's own tiny step counts, stage 3
    # (where the recipes differ) all 300 steps, and the VLAs learn the goal suite only (trained on all 40 tasks, a 300-step tiny VLA succeeds on none of them)
    "tiny": dict(demos_per_task=20, episodes=5, ref_episodes=10, vlm_eval="--depth_frames=32 --probe_steps=100",
                 pretrain_flags="--steps0=100 --steps1=30 --steps2=60 --steps3=300 --eval_every=0 --val_gen=32",
                 vla_suites="goal", vla_flags="--steps=300"),
    "small": dict(demos_per_task=50, episodes=20, ref_episodes=50, vlm_eval="--depth_frames=128 --probe_steps=1000"),
}


def plan(c: ReproConfig) -> list[dict]:
    """Every step: name, output directory, argv and the steps it needs (listed in a valid order)."""
    py, p, D, R = sys.executable, c.preset, c.data, c.runs
    demos, thr = D + "-demos", [f"--threads={c.threads}"]
    some = c.demo_tasks != "all"  # a subset of tasks per suite (micro)
    suites = list(SUITES) if c.vla_suites == "all" else c.vla_suites.split(",")
    vtasks = ([f"--tasks={','.join(f'{s}:{t}' for s in suites for t in c.demo_tasks.split(','))}"] if some
              else [] if c.vla_suites == "all" else [f"--tasks={c.vla_suites}"])
    etasks = ([f"--tasks={c.demo_tasks}"] if some else []) + [f"--suite={c.vla_suites}"]
    steps = []

    def add(name, out, argv, deps=()):
        steps.append(dict(name=name, out=out, argv=[py] + argv, deps=list(deps)))
    add("data", D, ["data.py", f"--out={D}", f"--preset={p}"] + c.data_flags.split())
    add("demos", demos, ["data.py", "demos", f"--per-task={c.demos_per_task}", f"--out={demos}"] + etasks)
    add("stage 0", f"{R}/base", ["train_pretrain.py", f"--preset={p}", "--recipe=base", f"--data={D}", f"--out={R}/base"] + thr
        + c.pretrain_flags.split(), ["data"])
    for ref in ("expert", "random"):
        add(f"reference {ref}", f"{R}/ref_{ref}", ["eval.py", "vla", f"--ckpt={ref}", "--refs=false", f"--episodes={c.ref_episodes}",
                                                   f"--out={R}/ref_{ref}", f"--workers={c.workers}"] + etasks)
    for s in c.seeds:
        S = f"{R}/seed{s}"
        for r in RECIPES:
            add(f"s{s} {r}", f"{S}/{r}", ["train_pretrain.py", f"--preset={p}", f"--recipe={r}", f"--init={R}/base",
                                          f"--data={D}", f"--out={S}/{r}", f"--seed={s}"] + thr + c.pretrain_flags.split(), ["stage 0"])
        for v, (r, w) in VLAS.items():
            add(f"s{s} {v}", f"{S}/{v}", ["train_vla.py", f"--preset={p}", f"--init={S}/{r}", f"--demos={demos}", f"--out={S}/{v}",
                                          f"--depth_weight={w}", f"--seed={s}"] + thr + vtasks + c.vla_flags.split(), [f"s{s} {r}", "demos"])
            add(f"s{s} eval {v}", f"{S}/{v}/eval_vla", ["eval.py", "vla", f"--ckpt={S}/{v}/ckpt", "--refs=false", f"--seed={s}",
                f"--episodes={c.episodes}", f"--out={S}/{v}/eval_vla", f"--workers={c.workers}"] + etasks
                + (["--gif"] if v == "vla_gem" else []), [f"s{s} {v}"])
        for r in RECIPES:
            add(f"s{s} eval {r}", f"{S}/{r}/eval_test", ["eval.py", "vlm", f"--ckpt={S}/{r}", f"--out={S}/{r}/eval_test",
                                                         f"--seed={s}"] + c.vlm_eval.split(), [f"s{s} {r}"])
    return steps


def run_steps(c: ReproConfig) -> list[dict]:
    """Run the plan, `jobs` steps at a time (single-threaded torch each: on a small CPU two 1-thread
    processes outrun one 2-thread process). Each step logs to <out>.log; a status line shows progress."""
    steps, log, running = plan(c), [], {}
    done = {st["name"] for st in steps if os.path.isfile(os.path.join(st["out"], ".done"))}
    for st in steps:
        if st["name"] in done:
            print(f"{st['name']}: done earlier, skipped", flush=True)
            log.append(json.load(open(os.path.join(st["out"], ".done"))) | {"skipped": True})
    todo, t0, last = [st for st in steps if st["name"] not in done], time.time(), 0.0
    old = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup below on kill, too
    try:
        while todo or running:
            for st in [st for st in todo if all(d in done for d in st["deps"])][:max(0, c.jobs - len(running))]:
                todo.remove(st)
                argv = st["argv"]
                if argv[1].startswith("train_") and os.path.isdir(st["out"]) and any(
                        d.startswith("stage") or d == "ckpt" for d in os.listdir(st["out"])):
                    argv = argv + ["--resume"]  # an interrupted training continues from its last checkpoint
                os.makedirs(os.path.dirname(st["out"]), exist_ok=True)
                f = open(st["out"] + ".log", "w")
                print(f"[{time.time() - t0:5.0f}s] start {st['name']}: {' '.join(argv[1:])}", flush=True)
                # own process group: stopping reproduce stops the step and its worker processes too
                proc = subprocess.Popen(argv, cwd=HERE, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
                running[st["name"]] = (st, proc, time.time(), f)
            time.sleep(0.5)
            for name, (st, proc, t, f) in list(running.items()):
                if proc.poll() is None:
                    continue
                f.close()
                del running[name]
                if proc.returncode != 0:
                    tail = open(st["out"] + ".log").read().splitlines()[-15:]
                    raise SystemExit("\n".join(tail) + f"\nerror: step '{name}' failed (exit {proc.returncode}); log: {st['out']}.log")
                rec = {"name": name, "seconds": round(time.time() - t, 1), "argv": st["argv"][1:]}
                os.makedirs(st["out"], exist_ok=True)
                with open(os.path.join(st["out"], ".done"), "w") as fd:
                    json.dump(rec, fd)
                done.add(name)
                log.append(rec)
                print(f"[{time.time() - t0:5.0f}s] done  {name} ({rec['seconds']:.0f} s); {len(done)}/{len(steps)} steps", flush=True)
            if running and time.time() - last > 15:  # progress: the last line (e.g. a tqdm bar) of each running step
                last = time.time()
                for name, (st, _, t, _) in running.items():
                    with open(st["out"] + ".log", "rb") as fl:
                        txt = fl.read()[-400:].decode(errors="replace").replace("\r", "\n").strip().splitlines()
                    print(f"[{time.time() - t0:5.0f}s]   {name} ({time.time() - t:.0f} s): {txt[-1][:110] if txt else ''}", flush=True)
    finally:
        for _, proc, _, _ in running.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        signal.signal(signal.SIGTERM, old)
    order = [st["name"] for st in steps]
    return sorted(log, key=lambda r: order.index(r["name"]))


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
    return v, (hi - lo) / 2, float(np.mean([t["chance"] for t in ts])), lo, hi


def vlm_cells(res: dict) -> dict:
    """One eval.py vlm results.json -> {column: (value, half-width, chance)}."""
    a, cells = res["all"], {}
    for f in ("grounding", "reasoning", "planning", "trajectory"):
        cells[f] = _part(a, a["per_family"][f]["types"]) if f in a["per_family"] else None
    cells["macro"] = _part(a, a["macro"]["types"])
    for k, name in (("seen", "seen"), ("heldout_template", "held-out templates"), ("heldout_combo", "held-out combos")):
        cells[name] = _part(res[k], res[k]["macro"]["types"]) if res.get(k) else None
    for g, types in GROUPS.items():
        cells[g] = _part(a, types)
    cells["reasoning (VSI-like)"] = cells["reasoning"]
    ch = res.get("depth", {}).get("chance", {})  # the average train depth map predicted for every frame
    for src, name in (("probe", "probe"), ("own head", "own head")):
        m = res.get("depth", {}).get(src)
        for k, label in (("fg_absrel", "AbsRel"), ("fg_delta1", "δ1"), ("fg_ordinal", "ordinal")):  # foreground pixels only
            cells[f"{name} {label}"] = (m[k], 1.96 * m.get(k + "_se", 0.0), ch.get(k)) if m else \
                ("no depth head" if src == "own head" else None)
    return cells


def vla_cells(sm: dict) -> dict:
    cells = {s: (v["rate"], (v["hi"] - v["lo"]) / 2, None, v["lo"], v["hi"]) for s, v in sm["per_suite"].items()}
    a = sm["average"]
    cells["avg"] = (a["rate"], (a["hi"] - a["lo"]) / 2, None, a["lo"], a["hi"])
    lg = sm["per_suite"].get("long")
    cells["subgoals on long"] = (lg["subgoals"], 0.0, None) if lg else None
    return cells


def combine(per_seed: list[dict | None]) -> dict:
    """{col: (value, half)} per seed -> {col: dict(mean, spread, half, n_seeds)}; spread = sd over seeds."""
    out = {}
    for col in per_seed[0] if per_seed and per_seed[0] else []:
        vals = [c[col] for c in per_seed if c and c.get(col) is not None]
        if not vals or isinstance(vals[0], str):  # missing, or a note such as "no depth head"
            out[col] = vals[0] if vals else None
            continue
        v = np.array([x[0] for x in vals], float)
        lo, hi = (vals[0][3], vals[0][4]) if len(vals) == 1 and len(vals[0]) > 3 else (None, None)
        out[col] = dict(mean=float(v.mean()), sd=float(v.std(ddof=1)) if len(v) > 1 else 0.0, lo=lo, hi=hi,
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
        if c is None or isinstance(c, str):
            return c or "n/a"
        scale = 1 if col.endswith("AbsRel") or col == "subgoals on long" else 100
        g = (lambda x: f"{x:.3f}") if col.endswith("AbsRel") else (lambda x: f"{x:.2f}") if scale == 1 else f
        if c["n"] == 1 and c["lo"] is not None:  # one seed: the (asymmetric) 95% Wilson interval
            return f"{g(c['mean'])} ({g(c['lo'])}–{g(c['hi'])})"
        spread = c["sd"] if c["n"] > 1 else c["half"]
        return f"{g(c['mean'])} ±{g(spread)}" if spread else g(c["mean"])
    lines = [f"| | {' | '.join(cols)} | {paper_head} |", "|---" * (len(cols) + 2) + "|"]
    if chance:
        first = next(iter(rows.values()))
        lines.append("| chance | " + " | ".join("-" if not isinstance(first.get(c), dict) or first[c]["chance"] is None
                                               else f"{first[c]['chance']:.3f}" if c.endswith("AbsRel") else f(first[c]["chance"])
                                               for c in cols) + " | |")
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(cell(r.get(c), c) for c in cols) + f" | {paper.get(name, '')} |")
    for a, b in diffs:
        cs = []
        for col in cols:
            x, y = rows[a].get(col), rows[b].get(col)
            if x is None or y is None or isinstance(x, str) or isinstance(y, str):
                cs.append("—" if isinstance(x, str) or isinstance(y, str) else "n/a")
                continue
            d = x["mean"] - y["mean"]
            s = "*" if significant(x, y) else ""
            cs.append(f"{d:+.3f}{s}" if col.endswith("AbsRel") else f"{d:+.2f}{s}" if col == "subgoals on long" else f"{100 * d:+.1f}{s}")
        lines.append(f"| {a} − {b} | " + " | ".join(cs) + f" | {paper.get(f'{a} − {b}', '')} |")
    return "\n".join(lines) + "\n"


def verdicts(vlm: dict, vla: dict, refs: dict) -> list[str]:
    """The paper's claims, one line each: our difference, and whether it clears the noise."""
    out = []
    for name, rows, a, b, col in [("depth supervision (gem vs sft), VLM macro", vlm, "gem", "sft", "macro"),
                                  ("depth supervision (gem vs sft), seen questions", vlm, "gem", "sft", "seen"),
                                  ("depth vs RGB reconstruction (gem vs rgb), reasoning", vlm, "gem", "rgb", "reasoning (VSI-like)"),
                                  ("progressive vs direct (gem vs direct), reasoning", vlm, "gem", "direct", "reasoning (VSI-like)"),
                                  ("features know depth (gem vs sft), probe ordinal", vlm, "gem", "sft", "probe ordinal"),
                                  ("GEM-VLA vs VLA without depth, average success", vla, "vla_gem", "vla_sft", "avg")]:
        x, y = rows[a].get(col), rows[b].get(col)
        if isinstance(x, dict) and isinstance(y, dict):
            d, sig = 100 * (x["mean"] - y["mean"]), significant(x, y)
            out.append(f"- {name}: {d:+.1f} points, " + ("**significant**" if sig else "within the noise (not significant)"))
    for r, col in (("sft", "macro"), ("gem", "macro"), ("sft", "seen"), ("gem", "seen")):
        m = vlm[r].get(col)
        if isinstance(m, dict):
            out.append(f"- `{r}` {col} {'macro ' if col == 'seen' else ''}score {100 * m['mean']:.1f} vs chance {100 * m['chance']:.1f} "
                       f"({'above' if (m['lo'] if m['n'] == 1 and m['lo'] is not None else m['mean'] - m['sd']) > m['chance'] else 'not clearly above'} chance)")
    return out


def curves(runs: dict[str, str]) -> str:
    """Training curves from each run's log.jsonl: every logged loss term at five points of each stage (first
    log, 1/4, 1/2, 3/4, last) and the validation numbers at the stage's end. Read them before any table:
    a loss still falling at the end means an undertrained model. Training text loss follows --loss_norm (mean
    per sample by default); validation text loss is always the mean per answer token (comparable across runs)."""
    out = ["| run | stage | steps | training loss terms (5 points) | validation at the end (text: per token) |",
           "|---|---|---|---|---|"]
    for name, d in runs.items():
        if not os.path.isfile(f"{d}/log.jsonl"):
            continue
        with open(f"{d}/log.jsonl") as f:
            recs = [json.loads(line) for line in f if line.strip()]
        recs = [r for r in recs if "step" in r]
        for st in sorted({r.get("stage", "vla") for r in recs}, key=str):
            rs = [r for r in recs if r.get("stage", "vla") == st]
            tr, va = [r for r in rs if "loss" in r], [r for r in rs if any(k.startswith("val_") for k in r)]
            if not tr:
                continue
            pts = [tr[round(i * (len(tr) - 1) / 4)] for i in range(5)]
            terms = [k for k in ("text", "flow", "action", "depth") if k in tr[-1]]
            cur = "; ".join(f"{k} " + " → ".join(f"{r[k]:.3g}" for r in pts) for k in terms)
            val = ", ".join(f"{k[4:]} {v:.3g}" for k, v in (va[-1] if va else {}).items() if k.startswith("val_") and isinstance(v, float))
            out.append(f"| {name} | {st} | {tr[-1]['step']} | {cur} | {val} |")
    return "\n".join(out) + "\n"


def write_readme(c: ReproConfig, log: list[dict], wall: float) -> str:
    R, S = c.runs, [f"{c.runs}/seed{s}" for s in c.seeds]
    vlm = {r: combine([vlm_cells(_load(f"{d}/{r}/eval_test/results.json")) for d in S]) for r in RECIPES}
    vla = {v: combine([vla_cells(next(iter(_load(f"{d}/{v}/eval_vla/results.json")["results"].values()))) for d in S])
           for v in VLAS}
    refs = {ref: combine([vla_cells(_load(f"{R}/ref_{ref}/results.json")["results"][ref])]) for ref in ("random", "expert")}
    t1 = ["grounding", "reasoning", "planning", "trajectory", "macro", "seen", "held-out templates", "held-out combos",
          "probe ordinal"]
    t2 = list(GROUPS) + ["reasoning (VSI-like)", "probe AbsRel", "probe δ1", "probe ordinal", "own head ordinal"]
    t3 = ["spatial", "object", "goal", "long", "avg", "subgoals on long"]
    try:  # the commit that trained the models (stage 0's run.json), not the one writing this page
        commit = _load(f"{R}/base/run.json")["git_commit"][:7]
    except (OSError, KeyError, ValueError):
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
    strip = f"{S[0]}/vla_gem/eval_vla/rollouts_policy.png"
    if os.path.isfile(strip):
        shutil.copyfile(strip, f"{c.results}/rollouts_vla_gem.png")
        figs.append("![GEM-VLA rollouts](rollouts_vla_gem.png) GEM-VLA rollouts, one row per suite "
                    f"(GIFs: {os.path.relpath(S[0], HERE)}/vla_gem/eval_vla/gifs/)")
    md = [f"# GEM-mini reproduction: preset `{c.preset}`, seeds {','.join(map(str, c.seeds))}\n",
          f"Command: `python reproduce.py --preset={c.preset} --seeds={','.join(map(str, c.seeds))}` · commit `{commit}` · "
          f"machine: {platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
          f"torch {torch.__version__} · summed step time {total / 60:.1f} min\n",
          "Cells with one seed: % (95% Wilson interval over questions / episodes), depth ± the 95% half-width over "
          "frames; with several seeds: mean ± the standard deviation over seeds. Δ rows: `*` marks a significant "
          "difference: larger than the 95% half-width of the difference (one seed) or than the sum of the two "
          "spreads over seeds (several seeds). Chance: the best constant answer from the train split "
          "(VLM), the average train depth map (depth) and the random policy (VLA). Paper columns: the paper's numbers for the matching row.\n",
          "## 1. Embodied reasoning: the same VLM and data, with and without depth supervision\n",
          "Macro: every test question; seen: questions in a training template about seen colour x shape pairs; "
          "held-out templates / combos: paraphrases never trained on / colour x shape pairs never seen.\n",
          table({r: vlm[r] for r in ("sft", "gem")}, t1, PAPER_T1, "paper 2B: VSI / MMSI / EmbSpatial", [("gem", "sft")]),
          "## 2. Ablation: what kind of generative supervision, and how it is introduced\n",
          table({r: vlm[r] for r in ("sft", "direct", "rgb", "regress", "gem")}, t2, PAPER_T2,
                "paper 2B: CV / VSI-abs / VSI-rel / VSI / RoboSpatial", [("gem", "rgb"), ("gem", "direct"), ("gem", "regress")]),
          "Depth probe: a fresh head fitted on each checkpoint's frozen features for the same budget, then "
          "scale-and-shift aligned on inverse depth (AbsRel lower is better); own head: the checkpoint's "
          "depth head, where it has one. Depth columns are on foreground pixels (where a frame differs from the "
          "average train depth map: objects, gripper): over the whole image the average map alone is nearly "
          "perfect after alignment (see results.json, key depth.chance), so whole-image numbers say little.\n",
          "## 3. VLA closed-loop success (fixed start states)\n",
          table({"random": refs["random"], **vla, "expert": refs["expert"]}, t3, PAPER_T3,
                "paper LIBERO: S / O / G / L / avg", [("vla_gem", "vla_sft")], chance=False),
          f"vla_sft: VLA on the `sft` VLM, no depth loss; vla_gem: VLA on the `gem` VLM with the depth loss x0.1 (GEM-VLA). "
          f"{c.episodes} start states per task ({c.ref_episodes} for the reference rows).\n",
          "## Reading the tables\n", "\n".join(verdicts(vlm, vla, refs)) + "\n",
          "## Training curves (seed " + str(c.seeds[0]) + ")\n",
          curves({"stage 0": f"{R}/base"} | {r: f"{S[0]}/{r}" for r in RECIPES} | {v: f"{S[0]}/{v}" for v in VLAS}),
          "## Figures: depth from the features (RGB | true depth | generated depth), rollouts\n", "\n\n".join(figs) + "\n",
          "## Step times\n", "| step | seconds |\n|---|---|\n" + "".join(f"| {r['name']} | {r.get('seconds', 0):.0f} |\n" for r in log)
          + f"\nWall time of this invocation: {wall / 60:.1f} min ({c.jobs} steps at a time)"
          + (f"; {sum(1 for r in log if r.get('skipped'))} steps were done by an earlier invocation (their own times are above).\n"
             if any(r.get("skipped") for r in log) else ".\n")]
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
    text = write_readme(c, log, time.time() - t)
    print(text)
    print(f"reproduce: done in {time.time() - t:.0f} s -> {c.results}/README.md")
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
