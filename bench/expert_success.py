"""Scripted-expert success rates per task and suite, and (with --write) the fixed evaluation start states.

Run:  .venv/bin/python bench/expert_success.py            # report
      .venv/bin/python bench/expert_success.py --write    # regenerate sim_eval_starts.json, then report
      .venv/bin/python bench/expert_success.py --suite=long   # one suite
Two numbers per task: `raw` = success over the first 50 candidate eval seeds (EVAL_SEED_BASE + k, k < 50,
before any filtering: the honest expert success rate), and `fixed` = success over the 50 fixed start states
(candidates are kept only where the expert succeeds, so this is 100% unless the simulator changed since the
file was written). Also prints the mean / max episode length against the suite's max_steps. No rendering.
"""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import sim_env as S  # noqa: E402


def run(suite, tid, seed):
    env = S.TabletopEnv(suite, tid, render_images=False)
    env.reset(seed=seed)
    for t in range(env.max_steps):
        _, _, term, trunc, _ = env.step(env.expert_action())
        if term or trunc:
            return term, t + 1
    return False, env.max_steps


if __name__ == "__main__":
    if "--write" in sys.argv:
        table = {f"{s}/{t}": S.generate_eval_seeds(s, t) for s in S.SUITES for t in range(len(S.SUITES[s]))}
        with open(S.EVAL_FILE, "w") as f:
            json.dump(table, f, separators=(",", ":"))  # nothing read the old file yet: eval_seeds below reads this one
        print(f"wrote {S.EVAL_FILE}")
    only = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--suite=")]
    for suite, tasks in S.SUITES.items():
        if only and suite not in only:
            continue
        raw_all, fixed_all, lens = 0, 0, []
        for tid in range(len(tasks)):
            raw = [run(suite, tid, S.EVAL_SEED_BASE + k) for k in range(S.N_EVAL)]
            fixed = [run(suite, tid, s) for s in S.eval_seeds(suite, tid)]
            r, f = sum(x for x, _ in raw), sum(x for x, _ in fixed)
            lens += [n for ok, n in fixed if ok]
            raw_all, fixed_all = raw_all + r, fixed_all + f
            print(f"{suite:8s} task {tid}: raw {r}/{S.N_EVAL}  fixed {f}/{S.N_EVAL}  max len {max(n for _, n in raw)}  {tasks[tid].name}")
        n = S.N_EVAL * len(tasks)
        print(f"== {suite:8s} raw {100 * raw_all / n:.1f}%  fixed {100 * fixed_all / n:.1f}%  "
              f"episode length mean {sum(lens) / len(lens):.0f} max {max(lens)} (max_steps {S.MAX_STEPS[suite]})", flush=True)
