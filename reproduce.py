"""One command from nothing to the paper's three tables at toy scale.

    python reproduce.py --preset=tiny --seeds=0        # ~30 min on a 2-core CPU
    python reproduce.py --preset=micro --seeds=0       # the same path in ~2 min (used by the tests)
    python reproduce.py --preset=small --seeds=0,1,2   # one GPU
    python reproduce.py --preset=tiny --seeds=0,1,2    # three training seeds: what a claim needs (~1.5 h on 2 cores)

Steps (each a subprocess of the owning script; a rerun skips a step whose `.done` marker holds the same argv
and code hash and redoes the rest, moving their old folders aside; an interrupted training step with the same
argv and code resumes with --resume):
  sim_data.py (VLM data, demos), eval.py rules (the 2D-rule baseline) -> per seed: train_pretrain.py base
  (stage 0, on its own --base_share of the train scenes) -> recipes sft, gem, rgb, direct, regress, blind (sft
  on grey images) on the other scenes -> train_vla.py on sft (no depth loss) and on gem (depth loss x0.1) ->
  eval.py vlm on every recipe, eval.py vla on both VLAs, plus the scripted-expert and random-policy rows ->
  results/<preset>/README.md and results.json (every per-seed number), rewritten as each step finishes (a run
  cut short keeps every finished comparison; the page names the steps still missing). --shares adds sft / gem on a share
  of the scenes, after everything else (bench/data_efficiency.py reads them).

Claims: a gem-vs-other difference is starred only over >= 3 training seeds, when a two-sided paired t-test
gives p < 0.05 after a Holm correction over its table (compare, holm; beside it the smallest difference the
seeds could show); fewer seeds claim nothing. Whether sft uses the image is a one-sided paired t-test per
column (above); where it does not, the tables say the comparison shows nothing there (no_signal).

Paper -> code map: table "embodied reasoning" (SFT vs GEM) -> table 1; ablation (RGB / direct / GEM) ->
table 2; LIBERO success -> table 3 (PAPER.md "Results to mirror").
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import re
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
RECIPES = ["sft", "gem", "blind", "rgb", "direct", "regress"]  # plan order: what the first table needs first (a run cut short keeps it)
RECIPE_FLAGS = {"blind": ["--recipe=sft", "--blind=true"]}  # blind: sft with every image one grey image
VLAS = {"vla_sft": ("sft", 0.0), "vla_gem": ("gem", 0.1)}  # name -> (VLM recipe, depth loss weight)


@dataclass
class ReproConfig:
    preset: str = "tiny"
    seeds: tuple[int, ...] = (0,)   # training seeds: stage 0, every recipe and VLA are trained once per seed
    recipes: str = ",".join(RECIPES)
    base_share: float = 1 / 3       # share of train scenes that only stage 0 sees (captions); the recipes get the rest
    shares: tuple[float, ...] = ()  # extra data shares (< 1) of the recipes' scenes for sft and gem (bench/data_efficiency.py)
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
    data_flags: str = ""        # extra sim_data.py flags (VLM data)
    workers: int = 2            # processes simulating: VLM data, demos, VLA rollouts
    jobs: int = 2               # steps run at once
    threads: int = 1            # torch threads per training step


PRESETS = {
    # micro's data: a test split holding an in-distribution question of every column of the page (data seed 4)
    "micro": dict(base_share=0.0, demos_per_task=2, demo_tasks="0", episodes=1, ref_episodes=1, workers=1,
                  data_flags="--test_rollouts=10 --test_reasoning_rollouts=3 --seed=4",
                  vlm_eval="--depth_frames=4 --probe_steps=5 --sample_steps=2 --max_new_tokens=24"),
    # tiny fits ~30 min on 2 cores: stages 0-2 get 2/3 to 1/2 of train_pretrain.py's own tiny step counts, stage 3
    # (where the recipes differ) all 300 steps, and the VLAs learn the goal suite only (trained on all 40 tasks, a 300-step tiny VLA succeeds on none of them)
    # (regress is left out of tiny's default to make room for the blind baseline: --recipes to add it)
    "tiny": dict(recipes="sft,gem,rgb,direct,blind", demos_per_task=20, episodes=5, ref_episodes=10, vlm_eval="--depth_frames=32 --probe_steps=100",
                 pretrain_flags="--steps0=100 --steps1=30 --steps2=60 --steps3=300 --eval_every=0",
                 vla_suites="goal", vla_flags="--steps=300"),
    # small: one GPU and its CPU cores: three steps share the GPU (a width-512 model leaves it idle between kernels)
    # while 8 processes simulate (data, demos, rollouts; each rollout worker has its policy on the GPU); target <= 8 min
    "small": dict(demos_per_task=50, episodes=20, ref_episodes=50, vlm_eval="--depth_frames=128 --probe_steps=1000 --batch_size=128",
                  jobs=3, threads=2, workers=min(8, os.cpu_count() or 2)),
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
    add("data", D, ["sim_data.py", f"--out={D}", f"--preset={p}", f"--workers={c.workers}"] + c.data_flags.split())
    add("demos", demos, ["sim_data.py", "demos", f"--per-task={c.demos_per_task}", f"--out={demos}", f"--workers={c.workers}"] + etasks)
    add("rules", f"{R}/rules", ["eval.py", "rules", f"--data={D}", f"--out={R}/rules"], ["data"])
    add("text-only", f"{R}/text", ["eval.py", "text", f"--data={D}", f"--out={R}/text"], ["data"])
    split = 1.0 - c.base_share  # recipes: scenes [0, split * share); stage 0: [split, 1)
    base_scenes = [f"--scenes={split:.6g}:1"] if c.base_share else []
    for ref in ("expert", "random"):
        add(f"reference {ref}", f"{R}/ref_{ref}", ["eval.py", "vla", f"--ckpt={ref}", "--refs=false", f"--episodes={c.ref_episodes}",
                                                   f"--out={R}/ref_{ref}", f"--workers={c.workers}"] + etasks)

    def arm(s, r, sh):  # train and evaluate one recipe on a share of the recipes' scenes
        S, name = f"{R}/seed{s}", arm_name(r, sh)
        scenes = [f"--scenes=0:{split * sh:.6g}"] if c.base_share or sh < 1 else []
        add(f"s{s} {name}", f"{S}/{name}", ["train_pretrain.py", f"--preset={p}"] + RECIPE_FLAGS.get(r, [f"--recipe={r}"])
            + [f"--init={S}/base", f"--data={D}", f"--out={S}/{name}", f"--seed={s}"] + scenes + thr + c.pretrain_flags.split(),
            [f"s{s} stage 0"])
        evals.append((f"s{s} eval {name}", f"{S}/{name}/eval_test", ["eval.py", "vlm", f"--ckpt={S}/{name}", f"--out={S}/{name}/eval_test",
                                                                     f"--seed={s}"] + c.vlm_eval.split(), [f"s{s} {name}"]))
    for s in c.seeds:
        S, evals = f"{R}/seed{s}", []
        add(f"s{s} stage 0", f"{S}/base", ["train_pretrain.py", f"--preset={p}", "--recipe=base", f"--data={D}", f"--out={S}/base",
                                           f"--seed={s}"] + base_scenes + thr + c.pretrain_flags.split(), ["data"])
        for r in recipes(c):
            arm(s, r, 1.0)
        for v, (r, w) in VLAS.items():
            add(f"s{s} {v}", f"{S}/{v}", ["train_vla.py", f"--preset={p}", f"--init={S}/{r}", f"--demos={demos}", f"--out={S}/{v}",
                                          f"--depth_weight={w}", f"--seed={s}"] + thr + vtasks + c.vla_flags.split(), [f"s{s} {r}", "demos"])
            add(f"s{s} eval {v}", f"{S}/{v}/eval_vla", ["eval.py", "vla", f"--ckpt={S}/{v}/ckpt", "--refs=false", f"--seed={s}",
                f"--episodes={c.episodes}", f"--out={S}/{v}/eval_vla", f"--workers={c.workers}"] + etasks
                + (["--gif"] if v == "vla_gem" else []), [f"s{s} {v}"])
        for e in evals:
            add(*e)
    for s in c.seeds:  # the data-efficiency arms last: the main tables never wait for them
        evals = []
        for sh in sorted(x for x in c.shares if x < 1):
            for r in ("sft", "gem"):
                arm(s, r, sh)
        for e in evals:
            add(*e)
    return steps


def recipes(c: ReproConfig) -> list[str]:
    out = [r for r in c.recipes.split(",") if r]
    bad = [r for r in out if r not in RECIPES] + [r for r in ("sft", "gem") if r not in out]
    if bad:
        raise SystemExit(f"error: --recipes={c.recipes}: {bad[0]!r} unknown or missing (known: {', '.join(RECIPES)}; sft and gem are required)")
    return out


def arm_name(recipe: str, share: float) -> str:
    return recipe if share >= 1 else f"{recipe}_{round(100 * share)}pct"


def check_shares(shares) -> None:
    names = [arm_name("sft", s) for s in shares]
    if any(not 0.01 <= s <= 1 for s in shares) or len(set(names)) < len(names):
        raise SystemExit(f"error: --shares={','.join(f'{s:g}' for s in shares)}: shares must lie in [0.01, 1] and differ in whole percents")


def needed(steps: list[dict], names: set[str]) -> list[dict]:
    """The steps named, and every step they depend on, in plan order."""
    by_name, want, todo = {st["name"]: st for st in steps}, set(), list(names)
    while todo:
        n = todo.pop()
        if n not in want:
            want.add(n)
            todo += by_name[n]["deps"]
    return [st for st in steps if st["name"] in want]


def ready(todo: list[dict], done: set) -> list[dict]:
    """The steps whose dependencies are done: VLA trainings first (the longest steps, at the end of the
    longest chain: stage 0 -> sft / gem -> VLA; starting them late is what makes a run long), then
    evaluations (short, and what the tables are made of: the first H200 run, cut at its limit, had trained
    sft and blind but evaluated neither while the ablations trained), else in plan order."""
    ok = [st for st in todo if all(d in done for d in st["deps"])]
    rank = {"train_vla.py": 0, "eval.py": 1}
    return sorted(ok, key=lambda st: rank.get(st["argv"][1], 2))  # a stable sort: plan order otherwise


def step_code(script: str) -> str:
    """A hash of the project's .py files a script runs: itself and every project module it imports,
    transitively (read from its import lines, those inside functions too)."""
    seen, todo = set(), [script]
    while todo:
        f = todo.pop()
        if f in seen or not os.path.isfile(os.path.join(HERE, f)):
            continue
        seen.add(f)
        with open(os.path.join(HERE, f)) as fh:
            todo += [m + ".py" for m in re.findall(r"^\s*(?:from|import)\s+(\w+)", fh.read(), re.M)]
    h = hashlib.sha256()
    for f in sorted(seen):
        with open(os.path.join(HERE, f), "rb") as fh:
            h.update(f.encode() + b"\0" + fh.read())
    return h.hexdigest()[:16]


def _marker(st: dict, kind: str) -> dict | None:
    path = os.path.join(st["out"], kind)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def fresh_steps(steps: list[dict]) -> set:
    """The steps a rerun may skip: done (`.done`) with the same argv and code as now, after fresh steps only.
    Every other step whose folder exists is moved aside (<out>.stale-N: nothing is deleted) unless it was
    interrupted with the same argv and code (`.started`), which resumes. A step after a redone one is redone."""
    sig = {st["name"]: dict(argv=st["argv"][1:], code=step_code(st["argv"][1])) for st in steps}
    fresh, stale = set(), set()
    for st in steps:  # plan order: dependencies first
        name, done = st["name"], _marker(st, ".done")
        deps_ok = not any(d in stale for d in st["deps"])
        if done is not None and done.get("sig") == sig[name] and deps_ok:
            fresh.add(name)
            continue
        stale.add(name)
        started = _marker(st, ".started")
        if os.path.isdir(st["out"]) and (done is not None or not deps_ok or started != sig[name]):
            k = 1
            while os.path.exists(f"{st['out']}.stale-{k}"):
                k += 1
            os.rename(st["out"], f"{st['out']}.stale-{k}")
            print(f"{name}: its settings, its code or a step before it changed since it ran: moved {st['out']} "
                  f"aside to .stale-{k}; running it again", flush=True)
    for st in steps:
        st["sig"] = sig[st["name"]]
    return fresh


def run_steps(c: ReproConfig, steps: list[dict] | None = None, after=None) -> list[dict]:
    """Run the plan (or the given steps of it), `jobs` steps at a time (single-threaded torch each: on a
    small CPU two 1-thread processes outrun one 2-thread process). Each step logs to <out>.log; a status line
    shows progress; after(log so far, names of the steps not finished) runs as each step finishes. A rerun
    skips the steps done with the same argv and code (fresh_steps) and redoes the rest."""
    steps, log, running = steps if steps is not None else plan(c), [], {}
    done = fresh_steps(steps)
    for st in steps:
        if st["name"] in done:
            print(f"{st['name']}: done earlier, skipped", flush=True)
            log.append(_marker(st, ".done") | {"skipped": True})
    todo, t0, last = [st for st in steps if st["name"] not in done], time.time(), 0.0
    old = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup below on kill, too
    try:
        while todo or running:
            for st in ready(todo, done)[:max(0, c.jobs - len(running))]:
                todo.remove(st)
                argv = st["argv"]
                if argv[1].startswith("train_") and os.path.isdir(st["out"]) and any(
                        d.startswith("stage") or d == "ckpt" for d in os.listdir(st["out"])):
                    argv = argv + ["--resume"]  # an interrupted training continues from its last checkpoint
                os.makedirs(st["out"], exist_ok=True)
                with open(os.path.join(st["out"], ".started"), "w") as fd:  # resumable only by the same argv and code
                    json.dump(st["sig"], fd)
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
                rec = {"name": name, "seconds": round(time.time() - t, 1), "argv": st["argv"][1:], "sig": st["sig"]}
                os.makedirs(st["out"], exist_ok=True)
                with open(os.path.join(st["out"], ".done"), "w") as fd:
                    json.dump(rec, fd)
                done.add(name)
                log.append(rec)
                print(f"[{time.time() - t0:5.0f}s] done  {name} ({rec['seconds']:.0f} s); {len(done)}/{len(steps)} steps", flush=True)
                if after is not None:
                    after(log, [st["name"] for st in steps if st["name"] not in done])
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
# Tables: every cell is (value, 95% question-sampling half-width, chance) per seed -> mean and spread over
# seeds. A difference is a claim only over >= MIN_SEEDS training seeds (compare); one seed claims nothing.

PAPER_T1 = {"sft": "60.0 / 28.9 / 72.7", "gem": "62.8 / 30.6 / 73.0", "gem − sft": "+2.8 / +1.7 / +0.3"}
PAPER_T2 = {"rgb": "80.9 / 47.5 / 62.8 / 60.0 / 44.6", "direct": "79.7 / 42.1 / 60.0 / 57.6 / 44.0",
            "gem": "81.1 / 47.8 / 65.2 / 63.0 / 48.9", "gem − rgb": "+0.2 / +0.3 / +2.4 / +3.0 / +4.3",
            "gem − direct": "+1.4 / +5.7 / +5.2 / +5.4 / +4.9"}
PAPER_T3 = {"vla_sft": "97.2 / 98.4 / 95.6 / 88.4 / 94.9", "vla_gem": "99.0 / 98.8 / 97.1 / 89.3 / 96.1",
            "vla_gem − vla_sft": "+1.8 / +0.4 / +1.5 / +0.9 / +1.2"}
# our question types standing in for the paper's benchmarks (table 2)
GROUPS = {"CV-like (relations, count)": ["rel_yn", "rel_mc", "count"], "abs. dist (distance, height)": ["distance", "height"],
          "rel. dist (closer, marked)": ["closer", "marked"], "Robo-like (place, fit)": ["place", "fit"]}
GEOMETRY = ["closer", "marked", "distance", "height", "fit"]  # the types eval.py rules has a 2D rule for
REASONING = ["closer", "marked", "distance", "height", "count", "fit", "rel_yn", "rel_mc"]  # eval.py text answers these
TYPES = GEOMETRY + ["rel_yn", "rel_mc", "count", "place", "box", "next_step"]  # the per-type table
MIN_SEEDS = 3


def load_json(path):
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
    """One eval.py vlm results.json -> {column: (value, half-width, chance)}. Every column but the two
    held-out ones is over the in-distribution test questions (new scenes; training templates and colour x
    shape pairs): what was trained. The held-out parts are their own columns, not in the macro."""
    if not res.get("seen"):
        raise SystemExit(f"error: {res.get('ckpt')}: its eval results have no in-distribution ('seen') test questions to report")
    s, cells = res["seen"], {}
    for f in ("grounding", "reasoning", "planning", "trajectory"):
        cells[f] = _part(s, s["per_family"][f]["types"]) if f in s["per_family"] else None
    cells["macro"] = _part(s, s["macro"]["types"])
    for k, name in (("heldout_template", "held-out templates"), ("heldout_combo", "held-out combos")):
        cells[name] = _part(res[k], res[k]["macro"]["types"]) if res.get(k) else None
    for g, types in GROUPS.items():
        cells[g] = _part(s, types)
    cells["reasoning (VSI-like)"] = cells["reasoning"]
    u = res.get("image_use") or {}  # eval.image_use: does the model use its image at all?
    cells["answers changed by a grey image"] = (u["changed"], 0.0, None) if u else None
    cells["image-token spread"] = (u["tokens"], 0.0, None) if u.get("tokens") is not None else None
    for t in TYPES:
        cells[t] = _part(s, [t])
    ch = res.get("depth", {}).get("chance", {})  # the average train depth map predicted for every frame
    for src, name in (("probe", "probe"), ("own head", "own head")):
        m = res.get("depth", {}).get(src)
        for k, label in (("fg_absrel", "AbsRel"), ("fg_delta1", "δ1"), ("fg_ordinal", "ordinal")):  # foreground pixels only
            cells[f"{name} {label}"] = (m[k], 1.96 * m.get(k + "_se", 0.0), ch.get(k)) if m else \
                ("no depth head" if src == "own head" else None)
    return cells


def rule_cells(res: dict, none: str = "no rule") -> dict:
    """eval.py rules (or text) results.json -> {type: (score, half-width, chance)} (deterministic: no seeds);
    `none` for a type the baseline does not answer."""
    per, mine = res["per_type"], GEOMETRY if res.get("kind", "rules") == "rules" else REASONING
    return {t: (per[t]["score"], (per[t]["hi"] - per[t]["lo"]) / 2, per[t]["chance"]) if t in per
            else none if t not in mine else None for t in TYPES}  # None: no such test questions


def vla_cells(sm: dict) -> dict:
    cells = {s: (v["rate"], (v["hi"] - v["lo"]) / 2, None) for s, v in sm["per_suite"].items()}
    a = sm["average"]
    cells["avg"] = (a["rate"], (a["hi"] - a["lo"]) / 2, None)
    lg = sm["per_suite"].get("long")
    cells["subgoals on long"] = (lg["subgoals"], 0.0, None) if lg else None
    return cells


def combine(per_seed: list[dict | None]) -> dict:
    """{col: (value, half, chance)} per seed -> {col: dict(mean, sd, half, n, chance, vals)}: sd over seeds,
    half = the mean question-sampling half-width, vals = the per-seed values (None where missing, so two
    rows pair up seed by seed)."""
    out = {}
    for col in next((c for c in per_seed if c), {}):
        vals = [c.get(col) if c else None for c in per_seed]
        given = [x for x in vals if x is not None]
        if not given or isinstance(given[0], str):  # missing, or a note such as "no depth head"
            out[col] = given[0] if given else None
            continue
        v = np.array([x[0] for x in given], float)
        out[col] = dict(mean=float(v.mean()), sd=float(v.std(ddof=1)) if len(v) > 1 else 0.0, n=len(v), chance=given[0][2],
                        half=float(np.mean([x[1] for x in given])), vals=[None if x is None else float(x[0]) for x in vals])
    return out


def _betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b) (a continued fraction, Lentz's method)."""
    if x <= 0 or x >= 1:
        return float(x >= 1)
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast on this side only
        return 1.0 - _betainc(b, a, 1 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    f, c, d = 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        num = 1.0 if i == 0 else (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)) if i % 2 == 0 else
                                  -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)))
        d = 1.0 / (1.0 + num * d if abs(1.0 + num * d) > 1e-300 else 1e-300)
        c = 1.0 + num / c if abs(1.0 + num / c) > 1e-300 else 1e-300
        f *= c * d
        if abs(c * d - 1.0) < 1e-14:
            break
    return front * (f - 1.0)


def t_sf(t: float, df: int) -> float:
    """P(T > t) for Student's t with df degrees of freedom."""
    p = 0.5 * _betainc(df / 2, 0.5, df / (df + t * t))
    return p if t >= 0 else 1.0 - p


def t_quantile(q: float, df: int) -> float:
    """The t with P(T > t) = 1 - q (bisection on t_sf)."""
    lo, hi = -1e3, 1e3
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_sf(mid, df) > 1 - q else (lo, mid)
    return (lo + hi) / 2


def compare(a: dict, b: dict) -> dict:
    """a - b over training seeds, paired seed by seed: mean and sd of the differences, the two-sided paired
    t-test's p (n - 1 degrees of freedom; None under 2 seeds), `p_above`: the one-sided p that a > b (the same
    t; what `above` tests), `mdd`: the smallest |mean| this n and spread
    would have made significant at 0.05, and `star`: p < 0.05 with >= MIN_SEEDS seeds, for this comparison
    alone (a table corrects its comparisons together: holm)."""
    d = np.array([x - y for x, y in zip(a["vals"], b["vals"]) if x is not None and y is not None], float)
    n = len(d)
    m, sd = (float(d.mean()) if n else 0.0), (float(d.std(ddof=1)) if n > 1 else 0.0)
    p = p_above = mdd = None
    if n > 1:
        se = sd / math.sqrt(n)
        p = 2 * t_sf(abs(m) / se, n - 1) if se > 0 else float(m == 0)
        p_above = t_sf(m / se, n - 1) if se > 0 else float(m <= 0)
        mdd = t_quantile(0.975, n - 1) * se
    return dict(mean=m, sd=sd, n=n, p=p, p_above=p_above, mdd=mdd, star=n >= MIN_SEEDS and p is not None and p < 0.05)


def holm(comps: list[dict], alpha: float = 0.05) -> list[dict]:
    """Holm's step-down correction over one table's comparisons: sort the p values, star the k-th smallest
    while p_k * (m - k) < alpha (k from 0), stop at the first that fails. Sets each comparison's `star`."""
    tested = sorted((c for c in comps if c["n"] >= MIN_SEEDS and c["p"] is not None), key=lambda c: c["p"])
    for c in comps:
        c["star"] = False
    for k, c in enumerate(tested):
        if c["p"] * (len(tested) - k) >= alpha:
            break
        c["star"] = True
    return comps


def above(a: dict, b: dict) -> bool:
    """a clearly above b, a directional check of its own (not in any table's Holm family): with >= MIN_SEEDS
    seeds a one-sided paired t-test, p < 0.05; with fewer, a difference beyond the question-sampling interval
    of the difference (the weaker check one seed allows)."""
    c = compare(a, b)
    if c["n"] >= MIN_SEEDS:
        return c["p_above"] < 0.05
    return c["mean"] > math.hypot(a["half"], b["half"])


def _fmt(col: str):
    if col.endswith("AbsRel") or col == "image-token spread":
        return 1, (lambda x: f"{x:.3f}")
    if col == "subgoals on long":
        return 1, (lambda x: f"{x:.2f}")
    return 100, (lambda x: f"{x:.1f}")


def table(rows: dict[str, dict], cols: list[str], paper: dict, paper_head: str, diffs: list[tuple[str, str]],
          chance: bool = True, marks: dict | None = None) -> str:
    """Cells: mean ±sd over seeds (±question-sampling half-width); Δ rows: mean ±sd of the paired per-seed
    differences, `*` by compare(); marks: {col: symbol} appended to that column's Δ cells."""
    def cell(c, col):
        if c is None or isinstance(c, str):
            return c or "n/a"
        k, g = _fmt(col)
        sd = f" ±{g(k * c['sd'])}" if c["n"] > 1 else ""
        return f"{g(k * c['mean'])}{sd} (±{g(k * c['half'])})" if c["half"] else f"{g(k * c['mean'])}{sd}"
    lines = [f"| | {' | '.join(cols)} | {paper_head} |", "|---" * (len(cols) + 2) + "|"]
    comps = {(a, b, col): compare(rows[a][col], rows[b][col]) for a, b in diffs for col in cols
             if isinstance(rows[a].get(col), dict) and isinstance(rows[b].get(col), dict)}
    holm(list(comps.values()))  # the table's family: every difference it shows
    if chance:  # from the last row with that column (a model row: chance over the same questions)
        ch = {c: next((r[c]["chance"] for r in reversed(list(rows.values())) if isinstance(r.get(c), dict)), None) for c in cols}
        lines.append("| chance | " + " | ".join("-" if ch[c] is None else _fmt(c)[1](_fmt(c)[0] * ch[c]) for c in cols) + " | |")
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(cell(r.get(c), c) for c in cols) + f" | {paper.get(name, '')} |")
    for a, b in diffs:
        cs = []
        for col in cols:
            x, y = rows[a].get(col), rows[b].get(col)
            if not isinstance(x, dict) or not isinstance(y, dict):
                cs.append("—" if isinstance(x, str) or isinstance(y, str) else "n/a")
                continue
            d, (k, g) = comps[(a, b, col)], _fmt(col)
            cs.append(f"{'+' if d['mean'] >= 0 else '−'}{g(k * abs(d['mean']))}" + (f" ±{g(k * d['sd'])}" if d["n"] > 1 else "")
                      + ("*" if d["star"] else "") + (marks or {}).get(col, "")
                      + (f" [{g(k * d['mdd'])}]" if d["n"] >= MIN_SEEDS else ""))
        lines.append(f"| {a} − {b} | " + " | ".join(cs) + f" | {paper.get(f'{a} − {b}', '')} |")
    return "\n".join(lines) + "\n"


def no_signal(vlm: dict, cols: list[str]) -> list[str]:
    """Columns where sft is not clearly above the blind baseline: there a gem - sft difference shows nothing."""
    if "blind" not in vlm:
        return []
    return [c for c in cols if isinstance(vlm["sft"].get(c), dict) and isinstance(vlm["blind"].get(c), dict)
            and not above(vlm["sft"][c], vlm["blind"][c])]


def verdicts(vlm: dict, vla: dict, n_seeds: int) -> list[str]:
    """The paper's claims, one line each: our difference, and whether it is a claim at all."""
    out = [] if n_seeds >= MIN_SEEDS else [f"- **{n_seeds} seed{'s' if n_seeds > 1 else ''}: no claim.** A difference is "
                                           f"claimed only over >= {MIN_SEEDS} training seeds; the numbers below are descriptive."]
    blind_cols, claims = set(no_signal(vlm, ["macro", "reasoning (VSI-like)"])), []
    for name, rows, a, b, col in [("depth supervision (gem vs sft), VLM macro (in-distribution)", vlm, "gem", "sft", "macro"),
                                  ("depth supervision (gem vs sft), reasoning", vlm, "gem", "sft", "reasoning (VSI-like)"),
                                  ("depth vs RGB reconstruction (gem vs rgb), reasoning", vlm, "gem", "rgb", "reasoning (VSI-like)"),
                                  ("progressive vs direct (gem vs direct), reasoning", vlm, "gem", "direct", "reasoning (VSI-like)"),
                                  ("features know depth (gem vs sft), probe ordinal", vlm, "gem", "sft", "probe ordinal"),
                                  ("GEM-VLA vs VLA without depth, average success", vla, "vla_gem", "vla_sft", "avg")]:
        x, y = rows.get(a, {}).get(col), rows.get(b, {}).get(col)
        if isinstance(x, dict) and isinstance(y, dict):
            claims.append((name, compare(x, y), 1 if col.endswith("AbsRel") else 100, col in blind_cols and rows is vlm))
    holm([d for _, d, _, _ in claims])  # the paper's claims are one family
    for name, d, k, blind in claims:
        what = (f"**p = {d['p']:.3f} after Holm over these claims: a difference**" if d["star"] else
                f"no difference shown (p = {d['p']:.2f} before correction; the smallest difference these seeds could "
                f"show: {k * d['mdd']:.1f})" if d["n"] >= MIN_SEEDS else "no claim (fewer than 3 seeds)")
        note = "; sft is not above the blind baseline in this column, so no model's score here shows what the image adds" if blind else ""
        out.append(f"- {name}: {k * d['mean']:+.1f} points" + (f" (±{k * d['sd']:.1f} over {d['n']} seeds)" if d["n"] > 1 else "")
                   + f", {what}{note}")
    for r in ("blind", "sft", "gem"):
        m = vlm.get(r, {}).get("macro")
        if isinstance(m, dict):
            out.append(f"- `{r}` in-distribution macro {100 * m['mean']:.1f} vs chance {100 * m['chance']:.1f}")
    return out


def curves(runs: dict[str, str]) -> str:
    """Training curves from each run's log.jsonl: every logged loss term at five points of each stage (first
    log, 1/4, 1/2, 3/4, last) and the validation numbers at the stage's end. Read them before any table:
    a loss still falling at the end means an undertrained model. Training text loss follows --loss_norm (mean
    per sample by default); validation text loss is always the mean per answer token (comparable across runs)."""
    out = ["| run | stage | steps | training loss terms (5 points) | validation at the end (text: per token) |",
           "|---|---|---|---|---|"]
    for name, d in runs.items():
        recs = _log(d)
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


def _log(run: str) -> list[dict]:
    """A run's log.jsonl records that belong to a step (none when the run has no log)."""
    if not os.path.isfile(f"{run}/log.jsonl"):
        return []
    with open(f"{run}/log.jsonl") as f:
        return [r for r in (json.loads(line) for line in f if line.strip()) if "step" in r]


def speed(runs: dict[str, str], every: dict[str, str] | None = None) -> str:
    """Training speed per run and stage: medians over the stage's log records after its first (start-up,
    compilation) of wall time per step, samples/s, model TFLOP/s and MFU (on a GPU in the peak table). Runs
    that train at once share the GPU, and each divides only its own FLOPs by the whole GPU's peak, so beside
    them: the GPU's total over the stage's span (the FLOPs of every run in `every` whose log windows overlap
    it, pro rata, over the span) and the runs that overlapped it by more than a tenth."""
    every = every or runs
    windows = {name: [(r["time"] - r["dt"], r["time"], r["tflops"] * r["dt"]) for r in _log(d) if "dt" in r]
               for name, d in every.items()}  # (start, end, TFLOP) per log record

    def overlap(w, a, b):  # the share of window w's TFLOP inside [a, b]
        return w[2] * max(0.0, min(w[1], b) - max(w[0], a)) / max(w[1] - w[0], 1e-9)
    out = ["| run | stage | steps | ms/step | samples/s | TFLOP/s | MFU | GPU total TFLOP/s | GPU total MFU | ran beside |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for name, d in runs.items():
        recs = [r for r in _log(d) if "samples_per_s" in r]
        for st in sorted({r.get("stage", "vla") for r in recs}, key=str):
            rs = [r for r in recs if r.get("stage", "vla") == st]
            first, rs = rs[0], rs[1:] or rs

            def med(k, fmt):
                return fmt.format(float(np.median([r[k] for r in rs]))) if all(k in r for r in rs) else "n/a"
            row = f"| {name} | {st} | {rs[-1]['step']} | {med('step_ms', '{:.1f}')} | {med('samples_per_s', '{:.0f}')} " \
                  f"| {med('tflops', '{:.3g}')} | {med('mfu', '{:.1%}')} |"
            if "dt" not in first:  # a log from before the windows were recorded
                out.append(row + " n/a | n/a | |")
                continue
            a, b = first["time"] - first["dt"], rs[-1]["time"]
            shares = {o: sum(overlap(w, a, b) for w in ws) for o, ws in windows.items()}
            beside = [o for o, ws in windows.items() if every.get(o) != d
                      and sum(max(0.0, min(w[1], b) - max(w[0], a)) for w in ws) > 0.1 * (b - a)]
            total = sum(shares.values()) / max(b - a, 1e-9)  # TFLOP/s of the whole GPU over the span
            peak = next((r["tflops"] / r["mfu"] for r in rs if r.get("mfu")), None)
            out.append(row + f" {total:.3g} | {'n/a' if peak is None else f'{total / peak:.1%}'} | {', '.join(beside)} |")
    return "\n".join(out) + "\n"


def _done(path):  # a finished step's results.json, or None while the step has not finished (a partial page)
    return load_json(path) if os.path.isfile(path) else None


def collect(c: ReproConfig) -> dict:
    """Every per-seed cell the tables use, from the runs' results.json files (kept in results.json); None
    for a step that has not finished yet."""
    R, S = c.runs, {s: f"{c.runs}/seed{s}" for s in c.seeds}
    vlm = {r: {s: _done(f"{d}/{r}/eval_test/results.json") for s, d in S.items()} for r in recipes(c)}
    vla = {v: {s: _done(f"{d}/{v}/eval_vla/results.json") for s, d in S.items()} for v in VLAS}
    refs = {ref: _done(f"{R}/ref_{ref}/results.json") for ref in ("random", "expert")}
    rules, text = _done(f"{R}/rules/results.json"), _done(f"{R}/text/results.json")
    return dict(
        seeds=list(c.seeds),
        vlm={r: {s: res and vlm_cells(res) for s, res in per.items()} for r, per in vlm.items()},
        vla={v: {s: res and vla_cells(next(iter(res["results"].values()))) for s, res in per.items()} for v, per in vla.items()},
        refs={ref: res and vla_cells(res["results"][ref]) for ref, res in refs.items()},
        rules=rules and rule_cells(rules), text=text and rule_cells(text, "not reasoning"))


def write_readme(c: ReproConfig, log: list[dict], wall: float, missing: list[str] = ()) -> str:
    """results.json and README.md from every finished step; `missing`: the steps not finished yet (the page
    is rewritten as steps finish, so a run cut short still leaves every finished comparison)."""
    S = [f"{c.runs}/seed{s}" for s in c.seeds]
    raw = collect(c)
    vlm = {r: combine(list(per.values())) for r, per in raw["vlm"].items()}
    vla = {v: combine(list(per.values())) for v, per in raw["vla"].items()}
    refs = {ref: combine([cells]) for ref, cells in raw["refs"].items()}
    rules, text = combine([raw["rules"]]), combine([raw["text"]])
    n = len(c.seeds)
    t1 = ["grounding", "reasoning", "planning", "trajectory", "macro", "held-out templates", "held-out combos", "probe ordinal"]
    t2 = list(GROUPS) + ["reasoning (VSI-like)", "probe AbsRel", "probe δ1", "probe ordinal", "own head ordinal"]
    t3 = ["spatial", "object", "goal", "long", "avg", "subgoals on long"]
    try:  # the commit that trained the models (stage 0's run.json), not the one writing this page
        commit = load_json(f"{S[0]}/base/run.json")["git_commit"][:7]
    except (OSError, KeyError, ValueError):
        commit = "unknown"
    import torch
    total = sum(r.get("seconds", 0) for r in log)
    os.makedirs(c.results, exist_ok=True)
    with open(f"{c.results}/results.json.tmp", "w") as f:
        json.dump(dict(raw, preset=c.preset, commit=commit, torch=torch.__version__, missing=list(missing)), f, indent=1)
    os.replace(f"{c.results}/results.json.tmp", f"{c.results}/results.json")
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
    quiet = no_signal(vlm, TYPES)
    t2_rows = {r: vlm[r] for r in ("sft", "direct", "rgb", "regress", "gem") if r in vlm}
    types_rows = {"text-only": text, "2D rule": rules} | {r: vlm[r] for r in ("blind", "sft", "gem") if r in vlm}
    seeds_txt = ",".join(map(str, c.seeds))
    md = [f"# GEM-mini reproduction: preset `{c.preset}`, seeds {seeds_txt}\n",
          f"Command: `python reproduce.py --preset={c.preset} --seeds={seeds_txt}` · commit `{commit}` · "
          f"machine: {platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
          f"torch {torch.__version__}, {torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'} · "
          f"summed step time {total / 60:.1f} min\n",
          (f"**{n} training seed{'s' if n > 1 else ''}: no claim.** Differences are claimed only over >= {MIN_SEEDS} seeds; "
           "nothing below is starred.\n" if n < MIN_SEEDS else
           f"{n} training seeds (stage 0, every recipe and VLA trained once per seed).\n"),
          (f"**Partial page: {len(missing)} step{'s' if len(missing) > 1 else ''} not finished** ({', '.join(missing)}); "
           "their cells read n/a.\n" if missing else ""),
          "Cells: mean ±sd over training seeds (±the 95% sampling half-width over questions, depth frames or episodes, "
          "averaged over seeds: a second error bar, which leaves out training noise). Δ rows: the mean ±sd of the per-seed paired differences; `*` "
          f"only with >= {MIN_SEEDS} seeds, where a two-sided paired t-test (n - 1 degrees of freedom) gives p < 0.05 after a Holm "
          "correction over that table's differences; [x]: the smallest difference these seeds could have shown at their spread. "
          "Whether sft uses the image (†) is a one-sided paired t-test per column, apart from the claims. Chance: the best "
          "constant answer from the train split (VLM), the average train depth map (depth), the random policy (VLA). "
          "Every number per seed is in results.json. Paper columns: the paper's numbers for the matching row.\n",
          "## 1. Embodied reasoning: the same VLM and data, with and without depth supervision\n",
          "Families and macro: the in-distribution test questions (new scenes, training templates, seen colour x shape "
          "pairs). Held-out templates / combos: paraphrases never trained on / colour x shape pairs never seen; not in the "
          "macro. blind: the sft recipe with every image one grey image (what the text alone gives).\n",
          table({r: vlm[r] for r in ("blind", "sft", "gem") if r in vlm}, t1, PAPER_T1, "paper 2B: VSI / MMSI / EmbSpatial",
                [("gem", "sft")], marks={col: "†" for col in no_signal(vlm, t1[:-1])}),  # not the probe: blind features see grey
          ("† sft is not clearly above the blind baseline in this column: the gem − sft difference there shows nothing.\n"
           if no_signal(vlm, t1[:-1]) else "" if "blind" in vlm else "No blind baseline was run (--recipes).\n"),
          "Does each model use its image (eval.image_use, in-distribution questions)? The share of its answers that change "
          "when the image is one grey image, and the spread across images of its last-layer image-token states over their "
          "overall spread: ~0 means the image was dropped, whatever the loss did.\n",
          table({r: vlm[r] for r in ("blind", "sft", "gem") if r in vlm}, ["answers changed by a grey image", "image-token spread"],
                {}, "", [], chance=False),
          "## 1b. Per question type: what the text, 2D boxes and the image give\n",
          "text-only: the best answerer that reads only the question's words (word and word-pair logistic regression, "
          "ridge regression, exact-question lookup; eval.py text): where it beats chance, the text gives the answer away. "
          "2D rule: the best rule on train that sees only the question text and the objects' 2D boxes (eval.py rules; "
          "on closer / marked / fit it shows how much of the question needs no depth). In-distribution test questions.\n",
          table(types_rows, TYPES, {}, "", [("gem", "sft")], marks={t: "†" for t in quiet}),
          (f"† sft is not clearly above blind on {', '.join(quiet)}: the comparison shows nothing for "
           f"{'that type' if len(quiet) == 1 else 'those types'}.\n" if quiet else
           "sft is above the blind baseline on every type.\n" if "blind" in vlm else "No blind baseline was run (--recipes).\n"),
          "## 2. Ablation: what kind of generative supervision, and how it is introduced\n",
          table(t2_rows, t2, PAPER_T2, "paper 2B: CV / VSI-abs / VSI-rel / VSI / RoboSpatial",
                [("gem", r) for r in ("rgb", "direct", "regress") if r in vlm], marks={c: "†" for c in no_signal(vlm, t2[:5])}),
          "† as in table 1: sft is not clearly above the blind baseline there, so no recipe's score shows what the image adds.\n"
          if no_signal(vlm, t2[:5]) else "",
          "Depth probe: a fresh head fitted on each checkpoint's frozen features for the same budget, then "
          "scale-and-shift aligned on inverse depth (AbsRel lower is better); own head: the checkpoint's "
          "depth head, where it has one. Depth columns are on foreground pixels (where a frame differs from the "
          "average train depth map: objects, gripper).\n",
          "## 3. VLA closed-loop success (fixed start states)\n",
          table({"random": refs["random"], **vla, "expert": refs["expert"]}, t3, PAPER_T3,
                "paper LIBERO: S / O / G / L / avg", [("vla_gem", "vla_sft")], chance=False),
          f"vla_sft: VLA on the `sft` VLM, no depth loss; vla_gem: VLA on the `gem` VLM with the depth loss x0.1 (GEM-VLA). "
          f"{c.episodes} start states per task ({c.ref_episodes} for the reference rows).\n",
          "## Reading the tables\n", "\n".join(verdicts(vlm, vla, n)) + "\n",
          "## Training curves (seed " + str(c.seeds[0]) + ")\n",
          curves({"stage 0": f"{S[0]}/base"} | {r: f"{S[0]}/{r}" for r in recipes(c)} | {v: f"{S[0]}/{v}" for v in VLAS}),
          "## Figures: depth from the features (RGB | true depth | generated depth), rollouts\n", "\n\n".join(figs) + "\n",
          "## Step times\n", "| step | seconds |\n|---|---|\n" + "".join(f"| {r['name']} | {r.get('seconds', 0):.0f} |\n" for r in log)
          + f"\nWall time of this invocation: {wall / 60:.1f} min ({c.jobs} steps at a time)"
          + (f"; {sum(1 for r in log if r.get('skipped'))} steps were done by an earlier invocation (their own times are above).\n"
             if any(r.get("skipped") for r in log) else ".\n"),
          "## Training speed (seed " + str(c.seeds[0]) + ")\n",
          "MFU: the FLOPs each step runs (real tokens; backward only where gradients flow) over the GPU's dense bf16 peak. "
          f"Up to {c.jobs} steps run at once: a run's own MFU counts only its FLOPs; GPU total: every training run's "
          "FLOPs over that stage's span (evaluations, which count none, may also have run).\n",
          speed({"stage 0": f"{S[0]}/base"} | {r: f"{S[0]}/{r}" for r in recipes(c)} | {v: f"{S[0]}/{v}" for v in VLAS},
                {f"s{s} {n}": f"{c.runs}/seed{s}/{d}" for s in c.seeds
                 for n, d in [("stage 0", "base")] + [(r, r) for r in recipes(c)] + [(v, v) for v in VLAS]})]
    text = "\n".join(md)
    with open(f"{c.results}/README.md.tmp", "w") as f:
        f.write(text)
    os.replace(f"{c.results}/README.md.tmp", f"{c.results}/README.md")
    return text


def config(argv: list[str]) -> ReproConfig:
    c = parse_config(ReproConfig, argv, PRESETS)
    check_shares(c.shares)
    if len(set(c.seeds)) < len(c.seeds) or not c.seeds:
        raise SystemExit(f"error: --seeds={','.join(map(str, c.seeds))}: give each training seed once")
    c.data, c.runs, c.results = (os.path.abspath(x) for x in (c.data or f"data/{c.preset}", c.runs or f"runs/{c.preset}",
                                                              c.results or f"results/{c.preset}"))
    return c


def main(argv: list[str]) -> str:
    c = config(argv)
    t = time.time()

    def page(log, missing):  # rewritten as steps finish: a run cut short keeps every finished comparison
        try:
            write_readme(c, log, time.time() - t, missing)
        except Exception as e:  # a page that cannot be written yet must not stop the run
            print(f"reproduce: warning: the partial page was not written ({type(e).__name__}: {e})", flush=True)
    log = run_steps(c, after=page)
    text = write_readme(c, log, time.time() - t)
    print(text)
    print(f"reproduce: done in {time.time() - t:.0f} s -> {c.results}/README.md")
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
