"""Benchmark: simulator steps per second (step + render of rgb, depth, seg + info) on ONE core.

Times are process CPU time (time.process_time), so a machine shared with other jobs still measures what one
core does; the wall-clock rate is printed too (it drops when the cores are oversubscribed).

Run:  .venv/bin/python bench/bench_sim.py [--steps=600] [--suite=long]
Rolls the scripted expert (its action is computed outside the timed region) and times env.step, which
renders a full observation each step, at 64x64 and 128x128; also times a reset and the expert itself.
"""
import os
for _k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_k] = "1"   # one core (set before numpy is imported)
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import sim_env  # noqa: E402


def bench(suite, size, n_steps):
    """Expert rollouts over the suite's tasks; returns steps/s of env.step alone, and of reset."""
    t_step, steps, t_reset, resets, t_exp, wall = 0.0, 0, 0.0, 0, 0.0, 0.0
    task = 0
    while steps < n_steps:
        env = sim_env.TabletopEnv(suite, task % 10, size)
        t0 = time.process_time(); env.reset(seed=task); t_reset += time.process_time() - t0; resets += 1
        done = False
        while not done and steps < n_steps:
            t0 = time.process_time(); a = env.expert_action(); t_exp += time.process_time() - t0
            t0, w0 = time.process_time(), time.perf_counter()
            _, _, term, trunc, _ = env.step(a)
            t_step += time.process_time() - t0; wall += time.perf_counter() - w0
            steps += 1
            done = term or trunc
        task += 1
    return steps / t_step, steps / wall, resets / t_reset, steps / t_exp


if __name__ == "__main__":
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
    n, suites = int(args.get("steps", 600)), args.get("suite", "goal,long").split(",")
    for suite in suites:
        for size in (64, 128):
            sps, wps, rps, eps = bench(suite, size, n)
            print(f"{suite:8s} {size:4d}x{size:<4d} step+render: {sps:6.0f} steps/s (wall {wps:5.0f})   "
                  f"reset: {rps:5.1f} /s   expert_action: {eps:6.0f} /s", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
