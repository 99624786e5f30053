"""Issue 25's search for a `tiny` VLM that sees: `sft` vs its blind twin per reasoning type, on VALIDATION, vs steps.

Each run trains stage 3 in chunks (--stop_after, then --resume: one cosine schedule over --steps3) and after every
chunk answers the whole val split (eval.py vlm --split=val), so its table row per chunk is a point of the run's
learning curve; beside the scores, the image use (answers changed by a grey image, spread of the image-token
states across images). The blind twin of a run is the run with --blind=true (train_pretrain.py; eval.py follows
it). The log of what was tried and what it showed: results/tiny/search.md.

    python bench/tiny_search.py --only=S,B         # data, the stage-0 base, sft and blind (~45 min on 2 cores)
    python bench/tiny_search.py --only=S --jobs=1  # one run
    python bench/tiny_search.py --only=S,B --seed=1 --out=runs/search_s1 --data=data/search   # another training seed
    python bench/tiny_search.py --summary=results/tiny/search_s0.md,results/tiny/search_s1.md,results/tiny/search_s2.md

--summary reads the tables of several training seeds (each one run of this script: its `search.md`) and compares
a pair of runs over them (--pair, default S3k vs its blind twin B3k, at the last step both have in every table):
per type the mean and sd of each, and of their paired per-seed difference, with the one-sided paired t-test's p
(reproduce.py's rule for "sft uses the image": p < 0.05 over >= 3 seeds).
"""
import concurrent.futures as cf
import glob
import json
import os
import subprocess
import sys
from dataclasses import dataclass

import numpy as np

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)
from common import parse_config  # noqa: E402
from reproduce import MIN_SEEDS, compare  # noqa: E402

# the data: tiny plus 300 train rollouts of extra scenes (each frame: a caption, the grounding questions and one
# question of each reasoning type), 4,798 captioned train images instead of 1,798
DATA = ["--preset=tiny", "--train_reasoning_rollouts=300"]
BASES = {  # stage 0: name -> flags. 5e-4, not the default 2e-3: the caption loss with the image falls twice as far
    "c": ["--steps0=1000", "--lr0=5e-4"],
    "cg": ["--steps0=1000", "--lr0=5e-4", "--families0=caption,grounding"],
}
SEE = ["--families=reasoning,caption", "--lr3=5e-4"]  # captions in stage 3 keep the vision path alive
RUNS = {  # name -> (base, stage-3 flags, steps, chunk)
    "S": ("c", SEE, 600, 300),
    "B": ("c", SEE + ["--blind=true"], 600, 300),
    "R": ("c", ["--families=reasoning", "--lr3=5e-4"], 600, 300),  # reasoning alone: the image is dropped
    "RB": ("c", ["--families=reasoning", "--lr3=5e-4", "--blind=true"], 600, 300),
    "SL": ("c", SEE, 1500, 300),
    "S3k": ("c", SEE, 3000, 600),
    "B3k": ("c", SEE + ["--blind=true"], 3000, 600),
    "S6k": ("c", SEE, 6000, 1000),  # how many steps the types still at their constant answer at 3,000 would take
    "S1e3": ("c", ["--families=reasoning,caption", "--lr3=1e-3"], 600, 300),
    "SG": ("cg", SEE, 600, 300),
}
TYPES = ["closer", "marked", "distance", "height", "count", "fit", "rel_yn", "rel_mc"]


@dataclass
class SearchConfig:
    out: str = "runs/search"
    data: str = "data/search"
    jobs: int = 2        # runs at once
    threads: int = 1     # CPU threads per run (2 cores: 1 with --jobs=2; 2 for a run alone)
    only: str = ""       # comma-separated run names (default: all)
    seed: int = 0        # training seed (stage 0 and stage 3)
    data_seed: int = 0   # generation seed of --data
    summary: str = ""    # comma-separated search.md tables, one per training seed: compare --pair over them
    pair: str = "S3k,B3k"  # the run with the image, its blind twin


def sh(argv: list, log: str) -> None:
    with open(log, "w") as f:
        if subprocess.run([sys.executable] + argv, cwd=HERE, stdout=f, stderr=subprocess.STDOUT).returncode:
            raise SystemExit(f"error: {' '.join(argv[:2])} failed, see {log}")


def row(name: str, steps: int, res: dict) -> str:
    pt, u = res["all"]["per_type"], res.get("image_use") or {}
    mean = sum(pt[t]["score"] for t in TYPES) / len(TYPES)
    return (f"| {name} | {steps} | " + " | ".join(f"{100 * pt[t]['score']:.1f}" for t in TYPES)
            + f" | {100 * mean:.1f} | {100 * u.get('changed', 0):.1f}% | {u.get('tokens') or 0:.2f} |")


def read_table(path: str) -> dict:
    """A search.md table -> {(run, steps): {type or "mean": score in points}}."""
    rows = {}
    for line in open(path):
        cells = [x.strip() for x in line.strip().strip("|").split("|")]
        if len(cells) == len(TYPES) + 5 and cells[1].isdigit():
            rows[cells[0], int(cells[1])] = dict(zip(TYPES + ["mean"], map(float, cells[2:len(TYPES) + 3])))
    return rows


def summary(paths: list[str], pair: str) -> str:
    """The pair of runs compared over the seeds' tables, at the last step both have in every table."""
    a, b = pair.split(",")
    tables = [read_table(p) for p in paths]
    steps = [{s for (n, s) in t if n == a} & {s for (n, s) in t if n == b} for t in tables]
    if not (common := set.intersection(*steps)):
        raise SystemExit(f"error: --summary: no step at which every table has both {a} and {b}: {paths}")
    step = max(common)
    lines = [f"{a} vs {b} at {step} steps over {len(paths)} seeds ({', '.join(paths)}): mean ±sd; one-sided paired t-test",
             f"| type | {a} | {b} | {a} − {b} | per seed | p (one-sided) | above |", "|---|---|---|---|---|---|---|"]
    ms = lambda v: f"{np.mean(v):.1f} ±{np.std(v, ddof=1) if len(v) > 1 else 0:.1f}"  # noqa: E731
    for t in TYPES + ["mean"]:
        x, y = ([tab[n, step][t] for tab in tables] for n in (a, b))
        d = compare(dict(vals=x), dict(vals=y))  # paired a - b: mean, sd, n, the one-sided p_above
        p = d["p_above"]
        yes = p is not None and p < 0.05 and d["n"] >= MIN_SEEDS
        lines.append(f"| {t} | {ms(x)} | {ms(y)} | {d['mean']:+.1f} ±{d['sd']:.1f} | "
                     + ", ".join(f"{u - v:+.1f}" for u, v in zip(x, y)) + " | "
                     f"{'n/a' if p is None else f'{p:.3f}'} | {'yes' if yes else 'no'} |")
    return "\n".join(lines)


def main(argv):
    c = parse_config(SearchConfig, argv)
    if c.summary:
        print(summary(c.summary.split(","), c.pair))
        return
    names = c.only.split(",") if c.only else list(RUNS)
    if bad := [n for n in names if n not in RUNS]:
        raise SystemExit(f"error: --only: unknown runs {bad}; valid: {', '.join(RUNS)}")
    os.makedirs(c.out, exist_ok=True)
    common = [f"--data={c.data}", f"--threads={c.threads}", f"--seed={c.seed}", "--preset=tiny"]
    if not os.path.isfile(f"{c.data}/val.jsonl"):
        sh(["sim_data.py", f"--out={c.data}", f"--seed={c.data_seed}", f"--workers={c.jobs}"] + DATA, f"{c.out}/data.log")
    pool = cf.ThreadPoolExecutor(max(1, c.jobs))

    def base(b):
        if not os.path.isdir(f"{c.out}/base_{b}/stage0"):
            sh(["train_pretrain.py", "--recipe=base", f"--out={c.out}/base_{b}", "--eval_every=100"] + common + BASES[b],
               f"{c.out}/base_{b}.log")

    def run(n):
        b, flags, steps, chunk = RUNS[n]
        out = f"{c.out}/{n}"
        for done in range(chunk, steps + 1, chunk):
            if os.path.isfile(f"{out}/eval_{done}/results.json"):
                continue
            sh(["train_pretrain.py", "--recipe=sft", f"--init={c.out}/base_{b}", f"--out={out}", f"--steps3={steps}",
                f"--stop_after={chunk}", f"--eval_every={chunk}", "--ckpt_every=0"] + common + flags
               + (["--resume"] if os.path.isdir(f"{out}/stage3") else []), f"{out}.train.log")
            sh(["eval.py", "vlm", f"--ckpt={out}", "--split=val", "--depth_frames=0", f"--threads={c.threads}",
                f"--out={out}/eval_{done}"], f"{out}.eval.log")
        print(f"{n}: done", flush=True)
    list(pool.map(base, sorted({RUNS[n][0] for n in names})))
    list(pool.map(run, names))
    lines = ["| run | steps | " + " | ".join(TYPES) + " | mean | grey changes | token spread |", "|---" * (len(TYPES) + 5) + "|"]
    for n in names:
        for f in sorted(glob.glob(f"{c.out}/{n}/eval_*/results.json"), key=lambda p: int(p.split("eval_")[1].split("/")[0])):
            res = json.load(open(f))
            if len(lines) == 2:
                pt = res["all"]["per_type"]
                lines += ["| chance | | " + " | ".join(f"{100 * pt[t]['chance']:.1f}" for t in TYPES) + " | | | |",
                          "| n | | " + " | ".join(str(pt[t]["n"]) for t in TYPES) + " | | | |"]
            lines.append(row(n, int(f.split("eval_")[1].split("/")[0]), res))
    table = "\n".join(lines)
    with open(f"{c.out}/search.md", "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main(sys.argv[1:])
