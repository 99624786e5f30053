"""Pre-flight for a lent GPU (bench/gpu_session.sh runs it first): everything the pipeline needs, checked in a
few seconds, so a missing package or a GPU that is not there ends the session at once and not minutes into it.

    python bench/preflight.py                 # on the GPU machine: needs CUDA
    python bench/preflight.py --cuda=false    # the same checks without the GPU (the tests run it so)

Checks: the runtime packages and every project module import; torch sees a GPU and a bf16 matmul on it is
finite; free disk under --work and available memory. One line out: `preflight ok: ...` (exit 0) or
`preflight failed: <what> ...` (exit 1)."""
import dataclasses
import importlib
import os
import platform
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import parse_config  # noqa: E402

PACKAGES = ["torch", "numpy", "PIL", "safetensors", "tokenizers", "tqdm", "pytest"]  # pytest: the CUDA tests
MODULES = ["common", "sim_env", "data", "model", "depth_head", "hf", "train_pretrain", "train_vla", "eval", "reproduce"]


@dataclasses.dataclass
class PreflightConfig:
    cuda: bool = True       # a GPU is required
    work: str = "/tmp"      # where data and checkpoints go
    min_disk_gb: float = 10.0   # small: ~10k images, the decode-once cache, checkpoints
    min_mem_gb: float = 4.0     # MemAvailable (some machines grow their memory as it is used: a floor, not a size)


def mem_available_gb() -> float:
    try:
        with open("/proc/meminfo") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("MemAvailable:")) / 2 ** 20
    except (OSError, StopIteration):
        return float("nan")


def check(c: PreflightConfig) -> str:
    """-> the facts line; raises RuntimeError naming the first thing that is missing."""
    for name in PACKAGES + MODULES:
        try:
            importlib.import_module(name)
        except Exception as e:
            raise RuntimeError(f"import {name}: {type(e).__name__}: {e}") from None
    import torch
    gpu = "no GPU"
    if c.cuda:
        if not torch.cuda.is_available():
            raise RuntimeError(f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU")
        a = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)
        if not torch.isfinite((a @ a).float()).all():
            raise RuntimeError("a bf16 matmul on the GPU is not finite")
        gpu = f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2 ** 30:.0f} GiB)"
    os.makedirs(c.work, exist_ok=True)
    disk = shutil.disk_usage(c.work).free / 2 ** 30
    if disk < c.min_disk_gb:
        raise RuntimeError(f"--work={c.work}: {disk:.1f} GB free, need {c.min_disk_gb:g}")
    mem = mem_available_gb()
    if mem < c.min_mem_gb:
        raise RuntimeError(f"{mem:.1f} GB memory available, need {c.min_mem_gb:g}")
    return (f"Python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), {gpu}, "
            f"{os.cpu_count()} CPUs, {disk:.0f} GB free under {c.work}, {mem:.0f} GB memory available")


def main(argv) -> int:
    c = parse_config(PreflightConfig, argv)
    t = time.time()
    try:
        facts = check(c)
    except RuntimeError as e:
        print(f"preflight failed: {e}", flush=True)
        return 1
    print(f"preflight ok ({time.time() - t:.1f} s): {facts}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
