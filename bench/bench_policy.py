"""Benchmark: GEM-VLA policy speed on CPU: inference latency (observation in -> action chunk out) and the
effective control rate with the action queue (one chunk of H actions serves replan_k environment steps).

Run:  .venv/bin/python bench/bench_policy.py --ckpt=runs/tiny/seed0/vla_gem/ckpt    (a trained checkpoint)
      .venv/bin/python bench/bench_policy.py                                       (random `tiny` weights)
Flags: --threads=1 --n=40 --replan_k=0 (0 = the checkpoint's) --flow_steps=0 --suite=goal --task=0
Target (DESIGN.md section 5): >= 100 actions/s with chunking in `tiny` on CPU.

Times are process CPU time (time.process_time) with `--threads` torch threads, so a machine shared with
other jobs still measures what the policy costs; wall-clock rates are printed beside them.
"""
import os
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import data as D  # noqa: E402
import sim_env  # noqa: E402
import train_pretrain as TP  # noqa: E402
import train_vla as V  # noqa: E402
from common import parse_config  # noqa: E402


@dataclass
class BenchConfig:
    ckpt: str = ""          # a train_vla.py run or ckpt directory; "" = random weights of --preset
    preset: str = "tiny"    # sizes for the random-weight policy (train_pretrain + train_vla presets)
    threads: int = 1
    n: int = 40             # timed chunks
    replan_k: int = 0       # 0 = the checkpoint's
    flow_steps: int = 0     # 0 = the checkpoint's
    suite: str = "goal"
    task: int = 0


def random_checkpoint(preset: str, root: str) -> str:
    """A VLA checkpoint with untrained weights (speed does not depend on them), built with the real code."""
    texts = [D.VLA_PROMPT.format(instr=t) for ts in sim_env.SUITES.values() for task in ts for t in task.templates]
    tok_path = os.path.join(root, "tokenizer.json")
    tok = D.train_tokenizer(texts * 4, tok_path)
    tc = parse_config(TP.TrainConfig, [f"--preset={preset}"], TP.PRESETS)
    gem = TP.build_gem(tc, tok)
    cfg = parse_config(V.VLAConfig, [f"--preset={preset}", "--depth_weight=0"], V.PRESETS)
    model = V.GEMVLA(gem, V.build_expert(cfg, gem.cfg))
    ident = {k: dict(mean=[0.0] * n, std=[1.0] * n) for k, n in (("state", 8), ("action", 7))}
    path = os.path.join(root, "ckpt")
    V.save_vla(path, model, cfg, tc, ident, tok_path)
    return path


def timed(fn):
    c, w = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - c, time.perf_counter() - w


def main(argv=None):
    bc = parse_config(BenchConfig, sys.argv[1:] if argv is None else argv, {p: {} for p in V.PRESETS})
    torch.set_num_threads(bc.threads)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = bc.ckpt or random_checkpoint(bc.preset, tmp)
        pol = V.Policy(ckpt, replan_k=bc.replan_k or None, flow_steps=bc.flow_steps or None)
    m, H, k = pol.model, pol.cfg.horizon, pol.k
    n_exp, n_vlm = (sum(p.numel() for p in x.parameters()) / 1e6 for x in (m.expert, m.vlm))
    print(f"policy: {'random ' + bc.preset if not bc.ckpt else ckpt}; VLM {n_vlm:.2f}M, expert {n_exp:.2f}M "
          f"({len(m.expert.blocks)} blocks), H={H}, replan_k={k}, {pol.steps} Euler steps, {bc.threads} thread(s)")

    # observations from a rollout of the scripted expert (a realistic spread of scenes)
    env = sim_env.TabletopEnv(bc.suite, bc.task)
    obs, _ = env.reset(options={"start_id": 0})
    frames = []
    while len(frames) < bc.n:
        frames.append(obs)
        obs, _, term, trunc, _ = env.step(env.expert_action())
        if term or trunc:
            obs, _ = env.reset(options={"start_id": len(frames) % 50})
    for o in frames[:3]:  # warm-up (allocator, oneDNN kernels)
        pol.predict([o])

    # latency, split into its parts: preprocessing, VLM forward + expert context, Euler sampling
    parts = {"preprocess": [], "vlm": [], "expert": [], "chunk": []}
    with torch.no_grad():
        for o in frames:
            item, c_pre, _ = timed(lambda: D.collate([pol.preprocess(o)], pol.pad_id))
            (_, ctx), c_vlm, _ = timed(lambda: m.encode(item["input_ids"], item["pixel_values"], item["attention_mask"]))
            _, c_exp, _ = timed(lambda: m.expert.sample(item["state"], ctx, pol.steps, pol.generator))
            _, c_all, w_all = timed(lambda: pol.predict([o]))
            for key, v in zip(parts, (c_pre, c_vlm, c_exp, c_all)):
                parts[key].append(v * 1e3)
            parts.setdefault("chunk_wall", []).append(w_all * 1e3)
    for key, v in parts.items():
        print(f"  {key:10s} ms: mean {np.mean(v):7.2f}  p50 {np.median(v):7.2f}  p90 {np.percentile(v, 90):7.2f}")

    # effective control rate: Policy.act through the queue (a chunk every k steps), simulator outside the timing
    pol.reset()
    env = sim_env.TabletopEnv(bc.suite, bc.task)
    obs, _ = env.reset(options={"start_id": 0})
    n_act, cpu, wall, sim_wall = bc.n * k, 0.0, 0.0, 0.0
    for _ in range(n_act):
        a, c, w = timed(lambda: pol.act(obs))
        cpu, wall = cpu + c, wall + w
        (obs, _, term, trunc, _), _, w = timed(lambda: env.step(a))
        sim_wall += w
        if term or trunc:
            obs, _ = env.reset(options={"start_id": 1})
            pol.reset()
    rate = n_act / cpu
    print(f"control rate (policy only, queue k={k} of H={H}): {rate:.0f} actions/s CPU time, {n_act / wall:.0f} wall "
          f"[target >= 100: {'met' if rate >= 100 else 'NOT met'}]")
    print(f"control rate with the simulator stepping too: {n_act / (wall + sim_wall):.0f} actions/s wall; "
          f"re-planning every step (k=1) would give {1e3 / np.mean(parts['chunk']):.0f} actions/s")


if __name__ == "__main__":
    main()
