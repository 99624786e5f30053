"""What it takes for the `tiny` VLM to answer each reasoning type above chance (issue: "make tiny learn").

Trains `sft` variants of stage 3 from stage-0 checkpoints and scores each on a large VALIDATION split
(200 rollouts, ~90-140 questions per reasoning type; the test split is never used for these choices):
    stage-3 steps          150 / 600 / 2400 (the tiny reproduction can afford ~150 per recipe on 2 cores)
    text loss              token mean (paper's code) vs sample mean (--loss_norm)
    learning rate          1e-3 vs 3e-3
    question position      before the image (--image_first=false, these runs' default) vs after it (true;
                           train_pretrain's default since the quality pass)
    image tokens           16 (8-px patches merged 2x2) vs 64 (--merge=1)
    data                   240 vs 960 train rollouts, or reasoning questions only (--families=reasoning)
The table it prints is results/tiny/learning_curve.md. One seed per row: a row's 95% interval is about
+/-9 points per type, so only larger differences mean anything.

    python bench/tiny_learning_curve.py --device=cuda --jobs=12     # ~15 min on one H100 (16 CPU cores)
    python bench/tiny_learning_curve.py --only=A150tok,B150smp      # a subset (CPU: ~5 min per 150 steps)
"""
import concurrent.futures as cf
import json
import os
import subprocess
import sys
from dataclasses import dataclass

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)
from common import parse_config  # noqa: E402

DATA = {"": ["--val_rollouts=200"], "L": ["--train_rollouts=960", "--val_rollouts=200"]}  # same val split
BASES = {"": ("", []), "L": ("L", []), "M": ("", ["--merge=1"]), "MI": ("", ["--merge=1", "--image_first=true"])}
TOK, SMP = ["--loss_norm=token"], ["--loss_norm=sample"]
RUNS = {  # name -> (stage-0 checkpoint, stage-3 flags)
    "A150tok": ("", TOK + ["--steps3=150"]),
    "B150smp": ("", SMP + ["--steps3=150"]),
    "C150smp3": ("", SMP + ["--steps3=150", "--lr3=3e-3"]),
    "D600tok": ("", TOK + ["--steps3=600"]),
    "E600smp": ("", SMP + ["--steps3=600"]),
    "F600smp3": ("", SMP + ["--steps3=600", "--lr3=3e-3"]),
    "G600imf": ("", SMP + ["--steps3=600", "--image_first=true"]),
    "H600rsn": ("", SMP + ["--steps3=600", "--families=reasoning"]),
    "I2400tok": ("", TOK + ["--steps3=2400"]),
    "J2400smp": ("", SMP + ["--steps3=2400"]),
    "K2400L": ("L", SMP + ["--steps3=2400"]),
    "M1merge1": ("M", SMP + ["--steps3=1600", "--max_len=224"]),
    "M2merge1i": ("MI", SMP + ["--steps3=1600", "--max_len=224", "--image_first=true"]),
    "R_imfirst": ("", SMP + ["--steps3=1600", "--image_first=true"]),
    "S_reasonL": ("L", SMP + ["--steps3=1600", "--families=reasoning"]),
    "T_lr3L": ("L", SMP + ["--steps3=1600", "--lr3=3e-3"]),
}
TYPES = ["rel_yn", "rel_mc", "closer", "marked", "distance", "height", "count", "fit"]


@dataclass
class CurveConfig:
    out: str = "runs/curve"
    data: str = "data/curve"
    device: str = "auto"
    jobs: int = 2        # runs at once (one CPU thread each)
    only: str = ""       # comma-separated run names (default: all)
    seed: int = 0


def sh(argv: list, log: str) -> None:
    with open(log, "w") as f:
        if subprocess.run([sys.executable] + argv, cwd=HERE, stdout=f, stderr=subprocess.STDOUT).returncode:
            raise SystemExit(f"error: {' '.join(argv[:2])} failed, see {log}")


def main(argv):
    c = parse_config(CurveConfig, argv)
    names = c.only.split(",") if c.only else list(RUNS)
    if bad := [n for n in names if n not in RUNS]:
        raise SystemExit(f"error: --only: unknown runs {bad}; valid: {', '.join(RUNS)}")
    os.makedirs(c.out, exist_ok=True)
    common = [f"--device={c.device}", "--threads=1", "--eval_every=0", "--ckpt_every=0", f"--seed={c.seed}"]
    bases = sorted({RUNS[n][0] for n in names})
    datas = sorted({BASES[b][0] for b in bases} | {""})
    pool = cf.ThreadPoolExecutor(max(1, c.jobs))

    def data(d):
        if not os.path.isfile(f"{c.data}{d}/val.jsonl"):
            sh(["sim_data.py", f"--out={c.data}{d}", "--preset=tiny", f"--workers={max(1, c.jobs)}"] + DATA[d], f"{c.out}/data{d}.log")

    def base(b):
        d, flags = BASES[b]
        flags = flags if any("image_first" in f for f in flags) else flags + ["--image_first=false"]
        if not os.path.isfile(f"{c.out}/base{b}/run.json") or not os.path.isdir(f"{c.out}/base{b}/stage0"):
            sh(["train_pretrain.py", "--preset=tiny", "--recipe=base", f"--data={c.data}{d}", f"--out={c.out}/base{b}",
                "--steps0=100"] + common + flags, f"{c.out}/base{b}.log")

    def run(n):
        b, flags = RUNS[n]
        flags = flags if any("image_first" in f for f in flags) else flags + ["--image_first=false"]
        res = f"{c.out}/{n}/eval_val/results.json"
        if not os.path.isfile(res):
            sh(["train_pretrain.py", "--preset=tiny", "--recipe=sft", f"--init={c.out}/base{b}", f"--data={c.data}{BASES[b][0]}",
                f"--out={c.out}/{n}"] + common + flags, f"{c.out}/{n}.log")
            sh(["eval.py", "vlm", f"--ckpt={c.out}/{n}", f"--data={c.data}", "--split=val", "--depth_frames=0"], f"{c.out}/{n}.eval.log")
        print(f"{n}: done", flush=True)
        return json.load(open(res))["all"]
    list(pool.map(data, datas))
    list(pool.map(base, bases))
    results = dict(zip(names, pool.map(run, names)))
    first = next(iter(results.values()))
    cell = lambda r, t, k="score": f"{100 * r['per_type'][t][k]:.1f}"  # noqa: E731
    lines = ["| run | flags | " + " | ".join(TYPES) + " | reasoning | macro |", "|---" * (len(TYPES) + 4) + "|",
             "| chance | best constant answer | " + " | ".join(cell(first, t, "chance") for t in TYPES)
             + f" | {100 * first['per_family']['reasoning']['chance']:.1f} | {100 * first['macro']['chance']:.1f} |",
             "| n | questions | " + " | ".join(str(first["per_type"][t]["n"]) for t in TYPES) + " | | |"]
    for n, r in results.items():
        b, flags = RUNS[n]
        desc = " ".join(f.lstrip("-") for f in BASES[b][1] + flags if "max_len" not in f) + (" (960 rollouts)" if BASES[b][0] else "")
        lines.append(f"| {n} | {desc} | " + " | ".join(cell(r, t) for t in TYPES)
                     + f" | {100 * r['per_family']['reasoning']['score']:.1f} | {100 * r['macro']['score']:.1f} |")
    table = "\n".join(lines)
    with open(f"{c.out}/learning_curve.md", "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main(sys.argv[1:])
