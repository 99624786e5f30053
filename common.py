"""GEM-mini shared helpers: typed flags, atomic checkpoints, distributed set-up, the learning-rate schedule, MFU.

A leaf: it imports nothing of the project, so the model, the simulator, the data and the scripts can all
use it without an import circle (nanochat keeps one such file).

  parse_config(cls, argv, presets)   dataclass config from --key=value flags and a named --preset; a
                                     field that is itself a dataclass (TrainConfig.model) takes its
                                     fields as plain flags (--dim=256)
  config_to_dict / config_from_dict  JSON round trip of those configs, one-line errors naming the file
  save_checkpoint / load_checkpoint  atomic checkpoint directories (DESIGN.md section 3)
  setup_dist / all_sum               torchrun DDP (gloo on CPU, nccl on GPU)
  lr_at                              linear warmup, then cosine decay (the paper's released recipe)
  run_log / record_run / WATCHING    a run's log.jsonl; its run.json (every invocation), and --resume refusing a
                                     setting that changes what the run computes
  require / resolve_device           one-line errors for a count below its minimum, a device that is not there
  die / git_commit                   one-line fatal errors; the commit recorded in every run
  vlm_flops / layer_flops / peak_tflops  MFU: the FLOPs a step runs (non-padding tokens, backward only where it
                                     runs; the head by hooks) over the GPU's dense bf16 peak (PEAK_BF16_TFLOPS)
  run_jobs / write_atomic            a process pool with a progress bar; text files written whole or not at all
                                     (the data makers: data.py's caches, sim_data.py)
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import time
import typing

import torch
import torch.distributed as dist
import torch.nn as nn


def die(msg: str):
    raise SystemExit(f"error: {msg}")


def git_commit() -> str:
    """$GEM_COMMIT when set (a copied tree, e.g. a lent GPU machine's, whose .git, if any, may be another
    commit's: seen there), else this checkout's commit."""
    if os.environ.get("GEM_COMMIT"):
        return os.environ["GEM_COMMIT"]
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        out = ""
    return out or "unknown"


# ----------------------------------------------------------------------------------------------------
# Typed flags

def _convert(name: str, typ, text: str):
    """Turn the text of flag --name into `typ`, or exit with a one-line message naming the flag."""
    origin = typing.get_origin(typ)
    if origin is typing.Union:  # Optional[X]: "none" means None, else X
        if text.lower() in ("none", "null", ""):
            return None
        typ = next(a for a in typing.get_args(typ) if a is not type(None))
        origin = typing.get_origin(typ)
    try:
        if typ is bool:
            if text.lower() in ("true", "1", "yes"):
                return True
            if text.lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if origin in (tuple, list):  # comma separated: --seeds=0,1,2
            (elem, *_) = typing.get_args(typ) or (str,)
            vals = [_convert(name, elem, t) for t in text.split(",") if t != ""]
            return tuple(vals) if origin is tuple else vals
        return typ(text)
    except (ValueError, TypeError):
        tname = getattr(typ, "__name__", str(typ))
        raise SystemExit(f"error: flag --{name} expects {tname}, got {text!r}")


def _nested(cls) -> dict:
    """Fields of `cls` that are dataclasses themselves: field name -> its dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])}


def parse_config(cls, argv: list[str], presets: dict[str, dict] | None = None):
    """Build dataclass `cls` from `--key=value` (or `--key value`) flags.

    `--preset=NAME` applies presets[NAME] first, then the other flags override it. A field whose type is
    a dataclass (TrainConfig.model: GEMConfig) is set through its own fields' names (--dim=256), so each
    size is declared once, in the model's config. Unknown flags and mistyped values exit with a one-line
    error that names the flag. `--help` lists every field.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    nested = _nested(cls)
    sub = {k: (name, typing.get_type_hints(c)[k]) for name, c in nested.items()
           for k in (f.name for f in dataclasses.fields(c))}  # flag -> (nested field, type)
    pairs, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            cfg = cls()
            lines = [f"  --{k}={getattr(cfg, k)!r}" for k in fields if k not in nested]
            lines += [f"  --{k}={getattr(getattr(cfg, n), k)!r}  ({n})" for k, (n, _) in sub.items()]
            extra = f"  presets: {', '.join(presets)}\n" if presets else ""
            raise SystemExit(f"flags of {cls.__name__} (defaults):\n" + "\n".join(lines) + "\n" + extra)
        if not arg.startswith("--"):
            raise SystemExit(f"error: unexpected argument {arg!r}: flags look like --key=value")
        if "=" in arg:
            key, val = arg[2:].split("=", 1)
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            key, val = arg[2:], argv[i + 1]
            i += 1
        elif {**hints, **{k: t for k, (_, t) in sub.items()}}.get(arg[2:].replace("-", "_")) is bool:
            key, val = arg[2:], "true"  # bare --flag means true
        else:
            raise SystemExit(f"error: flag {arg} needs a value (--key=value)")
        pairs.append((key.replace("-", "_"), val))
        i += 1
    values = {}  # flat: our fields and the nested configs' fields
    for key, val in pairs:
        if key == "preset":
            if presets is None or val not in presets:
                raise SystemExit(f"error: unknown --preset={val!r}; valid: {', '.join(presets or {})}")
            values.update(presets[val])
    if "preset" in fields:
        values.setdefault("preset", next((v for k, v in pairs if k == "preset"), fields["preset"].default))
    for key, val in pairs:
        if key == "preset":
            continue
        if key in fields and key not in nested:
            values[key] = _convert(key, hints[key], val)
        elif key in sub:
            values[key] = _convert(key, sub[key][1], val)
        else:
            valid = [k for k in fields if k not in nested] + list(sub)
            raise SystemExit(f"error: unknown flag --{key}; valid flags: " + ", ".join(f"--{k}" for k in valid))
    unknown = [k for k in values if (k not in fields or k in nested) and k not in sub]
    if unknown:  # a preset naming a field that does not exist
        raise SystemExit(f"error: preset {values.get('preset')!r} sets unknown field(s) {unknown}")
    kwargs = {k: v for k, v in values.items() if k in fields and k not in nested}
    for name in nested:  # the field's own default (its default_factory), then the flags
        f = fields[name]
        base = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        kwargs[name] = dataclasses.replace(base, **{k: v for k, v in values.items() if sub.get(k, (None,))[0] == name})
    return cls(**kwargs)


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(cls, d: dict, source: str = "config.json"):
    """Inverse of config_to_dict; a field this version does not know is an error naming the file."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{source}: unknown field(s) {unknown} for {cls.__name__} (written by another version? "
                         f"retrain or use the matching commit)")
    hints, nested = typing.get_type_hints(cls), _nested(cls)
    kw = {k: (config_from_dict(nested[k], v, source) if k in nested else
              tuple(v) if typing.get_origin(hints[k]) is tuple else v) for k, v in d.items()}
    return cls(**kw)


def run_log(out: str, rank: int):
    """-> (logf, log) of a run directory: logf(record) appends one JSON line to <out>/log.jsonl, log(msg) also
    prints it; both on rank 0 only (DDP)."""
    def logf(rec: dict):
        if rank == 0:
            with open(os.path.join(out, "log.jsonl"), "a") as f:
                f.write(json.dumps(rec) + "\n")

    def log(msg: str):
        if rank == 0:
            print(msg, flush=True)
            logf({"msg": msg})
    return logf, log


# what --resume may change in either trainer: how the run is watched and where it runs, never what it computes
WATCHING = frozenset({"resume", "log_every", "eval_every", "ckpt_every", "device", "compile", "peak_tflops", "threads",
                      "workers", "stop_after", "cache_dir"})


def record_run(out: str, cfg, also: set, write: bool = True, **facts) -> None:
    """Write <out>/run.json: `facts` and the resolved config of this invocation, every earlier invocation
    kept under "invocations". With cfg.resume, first refuse (one line naming the setting) a config that
    differs from the run's first one in anything but WATCHING and `also` (the script's own such settings),
    and a different world size: steps, batch, lr, data and shapes decide the schedule and the sample order of
    the steps already taken. Every DDP rank checks; `write`: rank 0."""
    path = os.path.join(out, "run.json")
    now = dict(facts, time=time.strftime("%Y-%m-%d %H:%M:%S"), config=config_to_dict(cfg))
    old = None
    if getattr(cfg, "resume", False) and os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        first = old.get("invocations", [old])[0]
        for key, (a, b) in _diff(first.get("config", {}), now["config"]).items():
            if key.split(".")[-1] not in WATCHING | also:
                die(f"--resume: --{key.split('.')[-1]}={b!r} differs from the run's {a!r} ({path}): it would change "
                    f"what the run computes; rerun with the old setting or start a new --out")
        if "world_size" in facts and first.get("world_size", facts["world_size"]) != facts["world_size"]:
            die(f"--resume: {facts['world_size']} processes, but the run started with {first['world_size']} ({path}): "
                f"the global batch and each rank's samples would change")
    if not write:
        return
    runs = (old.get("invocations", [old]) if old else []) + [now]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(dict(now, invocations=runs), f, indent=2)
    os.replace(tmp, path)


def _diff(a: dict, b: dict, prefix: str = "") -> dict:
    """Flattened {key: (a's value, b's value)} where two config dicts differ (nested configs: model.dim)."""
    out = {}
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out |= _diff(x, y, f"{prefix}{k}.")
        elif (list(x) if isinstance(x, (list, tuple)) else x) != (list(y) if isinstance(y, (list, tuple)) else y):
            out[prefix + k] = (x, y)
    return out


# ----------------------------------------------------------------------------------------------------
# Checkpoints

def save_checkpoint(path: str, tensors: dict[str, torch.Tensor], config: dict,
                    json_files: dict[str, dict] | None = None, copy_files: dict[str, str] | None = None,
                    train_state: dict | None = None) -> None:
    """Write a checkpoint directory atomically (DESIGN.md section 3).

    Everything goes to `<path>.tmp-<pid>` first; only a complete directory is renamed into place, so a
    run killed mid-write leaves the previous checkpoint intact. Layout: config.json, model.safetensors,
    any extra JSON files (e.g. norm_stats.json), copied files (e.g. tokenizer.json), train_state.pt.
    """
    from safetensors.torch import save_file
    path = os.path.normpath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    # safetensors refuses shared or non-contiguous storage: store plain contiguous copies
    save_file({k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()},
              os.path.join(tmp, "model.safetensors"))
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for name, obj in (json_files or {}).items():
        with open(os.path.join(tmp, name), "w") as f:
            json.dump(obj, f, indent=2)
    for name, src in (copy_files or {}).items():
        shutil.copyfile(src, os.path.join(tmp, name))
    if train_state is not None:
        torch.save(train_state, os.path.join(tmp, "train_state.pt"))
    old = f"{path}.old-{os.getpid()}"
    if os.path.exists(path):
        os.replace(path, old)  # the old one is kept until the new one is in place
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: str, with_train_state: bool = False):
    """Read a checkpoint directory -> (tensors, config dict, train_state or None). Errors name the file."""
    from safetensors.torch import load_file
    cfg_file, wfile = os.path.join(path, "config.json"), os.path.join(path, "model.safetensors")
    for f in (cfg_file, wfile):
        if not os.path.isfile(f):
            raise FileNotFoundError(f"{f}: missing (is {path!r} a GEM-mini checkpoint directory?)")
    try:
        with open(cfg_file) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}: not valid JSON ({e})") from None
    tensors = load_file(wfile)
    state = None
    sfile = os.path.join(path, "train_state.pt")
    if with_train_state and os.path.isfile(sfile):
        state = torch.load(sfile, map_location="cpu", weights_only=True)
    return tensors, config, state


# ----------------------------------------------------------------------------------------------------
# Training infrastructure shared by train_pretrain.py and train_vla.py

def require(cfg, **minimum) -> None:
    """A one-line error naming the first flag below its minimum: require(cfg, batch_size=1, steps=0)."""
    for k, m in minimum.items():
        if getattr(cfg, k) < m:
            die(f"--{k}={getattr(cfg, k)}: must be >= {m}")


def resolve_device(flag: str) -> torch.device:
    """--device: auto (the GPU when there is one) | cpu | cuda (or cuda:N); anything else, or a GPU that is
    not there, is a one-line error naming the flag."""
    if flag == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if flag != "cpu" and not re.fullmatch(r"cuda(:\d+)?", flag):
        die(f"--device={flag}: use auto, cpu or cuda")
    if flag != "cpu" and not torch.cuda.is_available():
        die(f"--device={flag}: this machine has no CUDA GPU that torch {torch.__version__} can use (--device=auto or cpu)")
    return torch.device(flag)


def setup_dist(cfg):
    """-> (device, rank, world, ddp). torchrun sets RANK/WORLD_SIZE; gloo on CPU so DDP is testable here.
    cfg needs .device (auto | cpu | cuda) and .threads (0 = torch's default)."""
    device = str(resolve_device(cfg.device))
    ddp = "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world = 0, 1
    if ddp:
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return torch.device(device), rank, world, ddp


def all_sum(x: torch.Tensor, ddp: bool) -> torch.Tensor:
    if ddp:
        x = x.clone()
        dist.all_reduce(x)
    return x


def lr_at(step: int, total: int, peak: float, warmup: float, min_lr_frac: float) -> float:
    """Linear warmup over the first `warmup` fraction of the steps, then cosine decay to min_lr_frac * peak."""
    warm = max(1, int(warmup * total))
    if step < warm:
        return peak * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return peak * (min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


# ----------------------------------------------------------------------------------------------------
# MFU: the FLOPs a training step runs, over the GPU's dense bf16 peak (train_pretrain.py's log, bench/)

# Dense BF16 tensor-core peaks (TFLOP/s, FP32 accumulate, no sparsity; vendor data sheets), matched against
# torch.cuda.get_device_name() in this order; --peak_tflops overrides, an unknown GPU logs no MFU.
PEAK_BF16_TFLOPS = [("H200", 989), ("H100 PCIe", 756), ("H100", 989), ("A100", 312), ("L40S", 362), ("L4", 121),
                    ("A10G", 70), ("A10", 125), ("RTX 4090", 165), ("RTX 3090", 71), ("V100", 0)]


def peak_tflops(device, flag: float) -> float:
    if flag or device.type != "cuda":
        return flag
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS if k in name), 0.0)


def vlm_flops(c, mask: torch.Tensor, trains: bool, grad_layers: int | None = None, text_grad: bool = True) -> float:
    """FLOPs of the VLM (c: model.GEMConfig) on one batch: its matmuls (2 x rows x weights) and attention (4 x queries x keys x
    width), on non-padding tokens only (mask (B, T)). A training VLM adds the backward, twice the forward of what
    it runs through: the ViT and merger (less the patch embedding's input gradient: pixels need none), the
    first `grad_layers` LLM layers (default all: the VLA's expert reads only the lower layers when no depth
    head reads the last) and the unembedding when a text loss trains (text_grad). Checked against
    torch.utils.flop_counter."""
    B, P, m2 = mask.shape[0], (c.image_size // c.patch_size) ** 2, c.merge ** 2
    patch = 2 * P * c.vit_dim * 3 * c.patch_size ** 2
    vit = c.vit_layers * (2 * P * (4 * c.vit_dim ** 2 + 2 * c.vit_dim * c.vit_mlp) + 4 * P * P * c.vit_dim)
    merger = 2 * c.n_image_tokens * (m2 * c.vit_dim) * (m2 * c.vit_dim + c.dim)  # odd grids: padded cells count
    T = mask.sum(1).double()  # (B,) real tokens
    weights = c.dim * (c.n_heads + 2 * c.n_kv_heads) * c.head_dim + c.n_heads * c.head_dim * c.dim + 3 * c.dim * c.mlp_dim
    layer = float(2 * weights * T.sum() + 4 * c.n_heads * c.head_dim * (T ** 2).sum())  # one LLM layer, forward
    unembed = float(2 * c.dim * c.vocab_size * T.sum())
    fwd = B * (patch + vit + merger) + c.n_layers * layer + unembed
    if not trains:
        return fwd
    g = c.n_layers if grad_layers is None else grad_layers
    return fwd + 2 * (B * (patch + vit + merger) + g * layer + text_grad * unembed) - B * patch


def layer_flops(module, run) -> float:
    """FLOPs of one forward + backward of `module`'s Linear / Conv2d layers, counted by forward hooks while
    run() makes a forward pass (no backward is needed): 2 x output elements x fan-in forward; backward, the
    weight gradient where the weights train plus the input gradient where the input needs one (autograd
    computes no other). Run it on the eager modules, before training: hooks added to and removed from a
    compiled model make torch.compile compile the step twice. run() draws nothing from the RNGs' streams."""
    total = 0.0

    def count(m, inp, out):
        nonlocal total
        fan = m.in_features if isinstance(m, nn.Linear) else m.in_channels // m.groups * math.prod(m.kernel_size)
        grads = torch.is_grad_enabled() * (int(m.weight.requires_grad) + int(inp[0].requires_grad))
        total += 2.0 * out.numel() * fan * (1 + grads)
    hooks = [m.register_forward_hook(count) for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    try:
        with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
            run()
    finally:
        for h in hooks:
            h.remove()
    return total


# ----------------------------------------------------------------------------------------------------
# Worker pools and atomic files (the data makers)

def _one_thread():  # a pool worker: the pool is the parallelism (and a forked torch must not reuse its thread pool)
    torch.set_num_threads(1)


def run_jobs(fn, jobs, workers: int, total: int, **bar_kw) -> None:
    """fn(job) for every job, in worker processes when workers > 1, with a tqdm bar over `total` jobs."""
    from tqdm import tqdm
    with tqdm(total=total, initial=total - len(jobs), **bar_kw) as bar:
        if workers > 1 and len(jobs) > 1:
            import multiprocessing as mp  # fork where available (cheap, inherits imports), else spawn
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            with ctx.Pool(workers, _one_thread) as pool:
                for _ in pool.imap_unordered(fn, jobs):
                    bar.update()
        else:
            for j in jobs:
                fn(j)
                bar.update()


def write_atomic(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
