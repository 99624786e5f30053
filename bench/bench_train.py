"""Training speed and MFU per stage, eager and compiled, at several batch sizes (issue 13's GPU numbers).

    python bench/bench_train.py --preset=small --batches=64,128 --modes=eager,compiled --steps=40 --out=/tmp/bt
    python bench/bench_train.py --preset=micro --batches=4 --modes=eager --steps=4     # the CPU smoke run

For each (batch size, mode): train_pretrain.py stage 0 (--recipe=base) for --steps steps, then the gem
recipe from it with --steps in each of stages 1-3, each a subprocess. Per stage it reads log.jsonl and
reports samples/s, TFLOP/s and MFU (common.vlm_flops + layer_flops over the GPU's bf16 peak) over
the log steps after the first (compilation and warm-up excluded). Without --data it generates a small
dataset of the preset's image size into --out first (~100 rollouts). Writes <out>/bench_train.md;
last line: `bench_train: stage 3 best MFU X% (batch B, mode M)` (MFU is logged on GPUs only).
"""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import parse_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class BenchConfig:
    preset: str = "small"
    data: str = ""
    out: str = "/tmp/bench_train"
    batches: tuple[int, ...] = (64, 128)
    modes: str = "eager,compiled"
    steps: int = 40
    workers: int = 6  # data-loading processes of train_pretrain.py (0 on a small CPU)


def run(argv: list[str], log: str) -> None:
    with open(log, "w") as f:
        r = subprocess.run([sys.executable] + argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        raise SystemExit(f"error: {' '.join(argv[:3])} ... failed (exit {r.returncode}); log: {log}")


def stage_speed(run_dir: str) -> dict:
    """{stage: {samples_per_s, tflops, mfu}} averaged over the log steps after each stage's first."""
    recs = [json.loads(line) for line in open(os.path.join(run_dir, "log.jsonl"))]
    out = {}
    for st in sorted({r["stage"] for r in recs if "samples_per_s" in r}):
        rs = [r for r in recs if r.get("stage") == st and "samples_per_s" in r][1:]
        if rs:
            out[st] = {k: float(np.mean([r[k] for r in rs])) for k in ("samples_per_s", "tflops", "mfu") if k in rs[0]}
    return out


def main(argv):
    c = parse_config(BenchConfig, argv, {p: {} for p in ("micro", "tiny", "small", "hf")})
    os.makedirs(c.out, exist_ok=True)
    data = c.data or os.path.join(c.out, "data")
    if not os.path.isfile(os.path.join(data, "train.jsonl")):
        run(["sim_data.py", f"--out={data}", f"--preset={'micro' if c.preset == 'micro' else c.preset}",
             "--train_rollouts=100", "--val_rollouts=4", "--test_rollouts=4", f"--workers={min(8, os.cpu_count() or 1)}"],
            os.path.join(c.out, "data.log"))
    rows, best = [], None
    for bs in c.batches:
        for mode in c.modes.split(","):
            tag = f"b{bs}-{mode}"
            flags = [f"--preset={c.preset}", f"--data={data}", f"--batch_size={bs}", f"--compile={mode == 'compiled'}",
                     f"--workers={c.workers}", "--eval_every=0", "--ckpt_every=0",
                     "--val_batches=1", f"--log_every={max(1, c.steps // 5)}"]
            base, gem = os.path.join(c.out, tag, "base"), os.path.join(c.out, tag, "gem")
            os.makedirs(os.path.join(c.out, tag), exist_ok=True)
            if not os.path.isdir(os.path.join(base, "stage0")):
                run(["train_pretrain.py", "--recipe=base", f"--out={base}", f"--steps0={c.steps}"] + flags, base + ".log")
            if not os.path.isdir(os.path.join(gem, "stage3")):
                run(["train_pretrain.py", "--recipe=gem", f"--init={base}", f"--out={gem}"] + flags
                    + [f"--steps{s}={c.steps}" for s in (1, 2, 3)], gem + ".log")
            for st, v in (stage_speed(base) | stage_speed(gem)).items():
                rows.append((bs, mode, st, v))
                if st == 3 and v.get("mfu") is not None and (best is None or v["mfu"] > best[0]):
                    best = (v["mfu"], bs, mode)
    lines = ["| batch | mode | stage | samples/s | TFLOP/s | MFU |", "|---|---|---|---|---|---|"]
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"
    lines += [f"| {bs} | {mode} | {st} | {v['samples_per_s']:.0f} | {v['tflops']:.2f} | {pct(v.get('mfu'))} |"
              for bs, mode, st, v in rows]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(c.out, "bench_train.md"), "w") as f:
        f.write(text)
    print(text)
    print("bench_train: stage 3 best MFU " + (f"{100 * best[0]:.1f}% (batch {best[1]}, mode {best[2]})" if best else "n/a (no GPU)"))


if __name__ == "__main__":
    main(sys.argv[1:])
