"""What bounds a training step: the PyTorch profiler over a few stage-3 `gem` steps (issue 13).

    python bench/profile_step.py --preset=small --batch_size=64 --steps=10            # on the GPU
    python bench/profile_step.py --preset=micro --batch_size=4 --steps=2 --device=cpu  # the CPU smoke run

Builds the preset's GEM and depth head (random weights: speed does not depend on them) and one synthetic
batch shaped like the data (image tokens + a question + an answer, every token valid), then times
train_pretrain.train_step (forward, backward, clipping) plus the optimizer step, eager or compiled, under
bf16 autocast on a GPU. With torch.profiler it reports, per step: wall time, the summed device-kernel
time, the share of the wall the device is busy, kernel launches, and the ops with the most device time.
A step whose device is busy most of the wall is bound by FLOPs (then MFU is what to raise); a step whose
device idles while hundreds of small kernels are launched is bound by the CPU launching them (then
CUDA graphs / torch.compile, larger batches, or fused ops help). Last line:
`profile_step: <device> batch B <mode>: X ms/step, device busy Y%, Z launches/step, MFU W% -> <verdict>`.
"""
import dataclasses
import os
import sys
import time
from contextlib import contextmanager, nullcontext

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402
import train_pretrain as TP  # noqa: E402
from common import parse_config  # noqa: E402
from depth_head import draw_noise  # noqa: E402
from model import GEM  # noqa: E402


@dataclasses.dataclass
class ProfileConfig:
    preset: str = "small"
    batch_size: int = 64
    steps: int = 10          # profiled steps, after `warmup` unprofiled ones
    warmup: int = 5
    question_tokens: int = 24  # text around the image: a typical question + answer of the data
    answer_tokens: int = 8
    compile: bool = False
    device: str = "auto"
    top: int = 12            # ops listed
    vocab_size: int = 1024   # the data's tokenizer size at small (sim_data.py GEN_PRESETS)


def synthetic_batch(cfg, c: ProfileConfig, head_size: int, device) -> dict:
    """One host batch shaped like the loader gives train_step (train_pretrain.host_batch; pinned for a GPU):
    <vision_start> image pads <vision_end>, question, answer (labelled), a depth target with every pixel valid,
    the flow's draws."""
    g = torch.Generator().manual_seed(0)
    B, n = c.batch_size, cfg.n_image_tokens
    text = torch.randint(10, cfg.vocab_size, (B, c.question_tokens + c.answer_tokens), generator=g)
    ids = torch.cat([torch.full((B, 1), cfg.vision_start_id), torch.full((B, n), cfg.image_pad_id),
                     torch.full((B, 1), cfg.vision_end_id), text], 1)  # (B, T)
    labels = torch.full_like(ids, -100)
    labels[:, -c.answer_tokens:] = ids[:, -c.answer_tokens:]
    b = dict(input_ids=ids, labels=labels, attention_mask=torch.ones_like(ids, dtype=torch.bool),
             images=torch.randint(0, 256, (B, 3, cfg.image_size, cfg.image_size), generator=g, dtype=torch.uint8),
             target=torch.rand(B, 1, head_size, head_size, generator=g),
             target_mask=torch.ones(B, 1, head_size, head_size, dtype=torch.bool),
             target_valid=torch.ones(B, dtype=torch.bool), pos=list(range(B)))
    b["flow_t"], b["flow_noise"], b["flow_u"] = draw_noise(b["target"], TP.sample_seeds(0, 3, b["pos"]))  # as the loader
    return {k: v.pin_memory() if torch.is_tensor(v) and device.type == "cuda" else v for k, v in b.items()}


def main(argv):
    c = parse_config(ProfileConfig, argv, {p: {} for p in TP.PRESETS})  # the preset names train_pretrain.py's
    tc = parse_config(TP.TrainConfig, [f"--preset={c.preset}"], TP.PRESETS)
    device = C.resolve_device(c.device)
    torch.manual_seed(0)
    gem = GEM(dataclasses.replace(tc.model, vocab_size=c.vocab_size)).to(device)
    head = TP.build_head(tc, gem, "gem").to(device)
    stage = 3
    params = TP.trainable(gem, head, stage, True, lambda m: None)
    model = TP.Bundle(gem, head, stage, tc)
    net = torch.compile(model) if c.compile else model
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")  # as train_pretrain.py
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    b = synthetic_batch(gem.cfg, c, tc.head_size, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step():
        TP.train_step(net, True, [b], params, stage, 0, tc, False, device, amp, "none")
        with torch.profiler.record_function("optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)

    head_f = TP.head_flops(head, gem.cfg, True, device) * c.batch_size  # forward + backward, on the eager head
    step()
    for _ in range(c.warmup):
        step()
    sync()
    t = time.perf_counter()
    for _ in range(c.steps):
        step()
    sync()
    wall = (time.perf_counter() - t) / c.steps  # seconds per step, without the profiler's overhead

    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof, clipping_labelled():
        for _ in range(c.steps):
            step()
        sync()
    events = prof.key_averages()
    on_device = device.type == "cuda"
    dev_time = lambda e: getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) if on_device \
        else e.self_cpu_time_total  # noqa: E731  microseconds
    # the kernels alone: an op's self device time repeats its kernels' (summing both counted each kernel
    # twice: "device busy 128%" in the first H200 run)
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA] if on_device else events
    busy = sum(dev_time(e) for e in kernels) / 1e6 / c.steps  # seconds of kernels per step
    launches = (sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
                if on_device else kernel_ops(prof)) / c.steps
    mask = b["attention_mask"]
    flops = C.vlm_flops(gem.cfg, mask, trains=True) + head_f  # per step, forward + backward
    peak = C.peak_tflops(device, 0.0)
    mfu = flops / wall / (peak * 1e12) if peak else float("nan")
    print(f"top {c.top} ops by {'device' if on_device else 'CPU'} time (per step):")
    for e in sorted(events, key=dev_time, reverse=True)[:c.top]:
        print(f"  {dev_time(e) / 1e3 / c.steps:9.2f} ms  {e.count / c.steps:7.1f} calls  {e.key[:80]}")
    share = busy / wall
    verdict = ("CPU run: the profile lists where the time goes" if not on_device else
               "bound by the CPU launching kernels (device idle between small kernels)" if share < 0.6 else
               "bound by device compute/memory (raise MFU: larger matmuls, fused kernels)")
    mode = "compiled" if c.compile else "eager"
    print(f"profile_step: {device.type} batch {c.batch_size} {mode}: {1e3 * wall:.1f} ms/step, device busy "
          f"{100 * share:.0f}%, {launches:.0f} {'launches' if on_device else 'kernel ops (at most the launches of an eager GPU step, autocast casts aside)'}"
          f"/step, {flops / wall / 1e12:.3g} TFLOP/s, "
          f"MFU {100 * mfu:.1f}% -> {verdict}")
    return dict(wall=wall, busy=busy, launches=launches, flops=flops, mfu=mfu)


@contextmanager
def clipping_labelled():
    """train_step's gradient clipping under the profiler label "optimizer", which kernel_ops leaves out (per
    tensor on the CPU, a few foreach kernels on a GPU)."""
    clip = torch.nn.utils.clip_grad_norm_

    def labelled(*args, **kw):
        with torch.profiler.record_function("optimizer"):
            return clip(*args, **kw)
    torch.nn.utils.clip_grad_norm_ = labelled  # looked up by train_step at every call
    try:
        yield
    finally:
        torch.nn.utils.clip_grad_norm_ = clip


# ops that launch no kernel themselves (views, allocations, no-ops); what runs below them still counts
NOT_KERNELS = {"aten::" + n for n in (
    "as_strided view _reshape_alias _unsafe_view alias view_as reshape flatten unflatten t transpose permute expand "
    "expand_as unsqueeze squeeze slice select split split_with_sizes chunk narrow unbind contiguous clone _to_copy "
    "resolve_conj resolve_neg detach detach_ lift_fresh empty empty_like empty_strided result_type set_ item "
    "_local_scalar_dense").split()}


def kernel_ops(prof) -> int:
    """Ops of a CPU profile that would each launch a GPU kernel: the lowest aten ops that compute (an op whose
    children compute is only their wrapper; views, allocations and no-ops launch none), leaving out aten::to
    (on the CPU mostly a Python scalar becoming a tensor, which a GPU kernel takes as an argument) and what
    runs under "optimizer" (the update and the gradient clipping: per tensor on the CPU, a few fused or
    foreach kernels on a GPU). An upper bound: ops a GPU runs fused (F.rms_norm) count as their CPU parts."""
    def count(e):
        if e.name in ("aten::to", "optimizer"):
            return 0
        below = sum(count(ch) for ch in e.cpu_children)
        return below or int(e.name.startswith("aten::") and e.name not in NOT_KERNELS)
    return sum(count(e) for e in prof.events() if e.cpu_parent is None)


if __name__ == "__main__":
    main(sys.argv[1:])
