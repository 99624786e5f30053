"""How fast does training get its batches? From the PNGs and from the decode-once cache (issue 13).

    python bench/bench_data.py [--sizes=64,128] [--steps=20] [--batch=64] [--data=DIR] [--demos=DIR]

Times exactly what train_pretrain.run_stage does per step, on one core: StepItems (shuffled, stateless
sample order) -> host_chunks (length_chunks, host_batch) -> on_device, for each image size, once reading
the PNGs (cache=False) and once from data.build_cache's memory-mapped arrays, after checking that both give
identical batches. Without --data it generates a small `micro`-style dataset per size in a temporary
directory (~100 images). Rates are samples per second of this process's CPU time (one thread), so a busy
machine does not lower them. It also times the host part alone: what the loader's worker processes do
when training runs on a GPU (on_device converts the uint8 images to pixel_values on the device). Then the VLA's path (train_vla: demo chunks from the frame cache, and re-rendered as the baseline).
Target: >= 5,000 samples/s at 128 px from the cache. Last line: `bench_data: cache 128 px N samples/s`.
"""
import functools
import gc
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data as D  # noqa: E402
import sim_data  # noqa: E402
import train_pretrain as TP  # noqa: E402


def batches(ds, steps: int, batch: int, pad_id: int, on_gpu: bool = False):
    """The step loop's data path (train_pretrain.run_stage), depth modality: StepItems with host_chunks (what
    the loader's worker processes run), then on_device on the CPU. on_gpu: the host part alone (a GPU run
    converts the uint8 images to pixel_values on the device)."""
    steps_ = D.StepItems(ds, seed=0, start=0, total=steps, gbatch=batch, world=1, rank=0, bs=batch, accum=1,
                          collate=functools.partial(TP.host_chunks, pad_id=pad_id, modality="depth"))
    for k in range(steps):
        for h in steps_[k][0]:
            yield h if on_gpu else D.on_device(h, torch.device("cpu"))


def main(argv):
    kw = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    sizes = [int(s) for s in kw.get("sizes", "64,128").split(",")]
    steps, batch = int(kw.get("steps", 20)), int(kw.get("batch", 64))
    torch.set_num_threads(1)
    last = None
    for S in sizes:
        root = kw.get("data") or os.path.join(tempfile.mkdtemp(prefix="bench_data_"), f"d{S}")
        if not os.path.isfile(os.path.join(root, "train.jsonl")):
            sim_data.generate(sim_data.GenConfig(**dict(sim_data.GEN_PRESETS["micro"], out=root, preset="micro", image_size=S,
                                                        train_rollouts=24, round_robin=False, workers=1)))
        tok = D.load_tokenizer(os.path.join(root, "tokenizer.json"))
        pad = D.special_ids(tok)["pad_id"]
        common = dict(tok=tok, image_size=S, n_image_tokens=(S // 8 // 2) ** 2, head_size=S // 2, max_len=160)
        t = time.time()
        cached = D.GemDataset(root, "train", cache=True, **common)
        build = time.time() - t
        files = D.GemDataset(root, "train", **common)
        gc.freeze()  # as train_pretrain.run_stage does
        for a, b in zip(batches(files, 2, batch, pad), batches(cached, 2, batch, pad)):  # identical batches first
            for k in a:
                assert (torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k]), f"{S} px: {k} differs"
        rates = {}
        for name, ds in (("png", files), ("cache", cached), ("cache, CPU part of a GPU step", cached)):
            n_steps = max(2, steps // 10) if name == "png" else steps  # the PNG path is slow: fewer steps
            t, n = time.process_time(), 0  # CPU time of this process: one core, fair on a shared machine
            for b in batches(ds, n_steps, batch, pad, on_gpu="GPU" in name):
                n += len(b["input_ids"])
            rates[name] = n / (time.process_time() - t)
        print(f"{S} px, {len(files)} records, batch {batch}: png {rates['png']:.0f} samples/s, cache {rates['cache']:.0f} "
              f"samples/s ({rates['cache'] / rates['png']:.1f}x; {rates['cache, CPU part of a GPU step']:.0f} samples/s without the "
              f"uint8 -> float conversion, which a GPU run does on the device); cache built in {build:.1f} s (identical batches)")
        last = (S, rates["cache"])
        vla_rates = bench_vla(S, tok, steps, batch, pad, kw.get("demos"))
        print(f"{S} px VLA (demo chunks): rendered per sample {vla_rates['render']:.0f} samples/s, cache "
              f"{vla_rates['cache']:.0f} samples/s (the CPU part of a GPU step: train_vla's own loader items + collate)")
    print(f"bench_data: cache {last[0]} px {last[1]:.0f} samples/s")


def bench_vla(S: int, tok, steps: int, batch: int, pad: int, demos: str | None = None) -> dict:
    """train_vla's data path on one core: StepItems over DemoDataset -> collate (images stay uint8; the device
    converts them), from the demo frame cache and, as the baseline, re-rendering every frame."""
    root = demos or os.path.join(tempfile.mkdtemp(prefix="bench_demos_"), "demos")
    if not os.path.isdir(root):
        sim_data.generate_demos(sim_data.DemoConfig(out=root, suite="goal", per_task=2, workers=1))
    kw = dict(image_size=S, horizon=16, head_size=S // 2, n_image_tokens=(S // 8 // 2) ** 2)
    sets = {"cache": D.DemoDataset(root, tok, cache=True, **kw), "render": D.DemoDataset(root, tok, cache=False, **kw)}
    rates = {}
    for name, ds in sets.items():
        n_steps = max(2, steps // 10) if name == "render" else steps
        steps_ = D.StepItems(ds, seed=0, start=0, total=n_steps, gbatch=batch, world=1, rank=0, bs=batch, accum=1,
                              collate=functools.partial(D.collate, pad_id=pad, pixels=False))  # as train_vla.py
        t = time.process_time()
        n = sum(len(steps_[k][0]["input_ids"]) for k in range(n_steps))
        rates[name] = n / (time.process_time() - t)
    return rates


if __name__ == "__main__":
    main(sys.argv[1:])
