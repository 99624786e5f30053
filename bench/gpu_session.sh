#!/bin/bash
# Issue 13's GPU measurements in one pass of under 10 minutes, for a session with a lent GPU:
#     bash bench/gpu_session.sh "$OUT"          # (the device tool's output folder; default /tmp/gpu_session)
# Writes every log under the folder, and summary.txt with the last line of each part. Each part has its
# own time limit, so one slow part cannot eat the others' time. Parts: the machine; the data path (CPU,
# cache vs PNGs, 128 px); what bounds a small stage-3 step (torch profiler: eager and compiled, batch 64
# and 128); samples/s, TFLOP/s and MFU per stage from train_pretrain.py's own log (bench_train.py).
# The full `python reproduce.py --preset=small --seeds=0` (target <= 8 min) is a separate command.
set -u
OUT=${1:-/tmp/gpu_session}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
part() {  # part NAME SECONDS CMD...: run with a limit, keep its log, add its last line to the summary
  local name=$1 limit=$2; shift 2
  local t=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name (rc $rc, $(( $(date +%s) - t )) s): $(grep -v '^\s*$' "$OUT/$name.log" | tail -1)" | tee -a "$OUT/summary.txt"
}
{ nvidia-smi; $PY -c "import torch, sys; print(sys.version); print('torch', torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"; git log -1 --oneline; } > "$OUT/machine.txt" 2>&1
part bench_data 90 $PY bench/bench_data.py --sizes=128 --steps=20 --batch=64
part profile_b64_eager 60 $PY bench/profile_step.py --preset=small --batch_size=64 --steps=10
part profile_b128_eager 60 $PY bench/profile_step.py --preset=small --batch_size=128 --steps=10
part profile_b64_compiled 120 $PY bench/profile_step.py --preset=small --batch_size=64 --steps=10 --compile=true
part bench_train 300 $PY bench/bench_train.py --preset=small --batches=64,128 --modes=eager,compiled --steps=30 --out="$OUT/bench_train"
cp "$OUT/bench_train/bench_train.md" "$OUT/" 2>/dev/null
echo "done: $OUT/summary.txt"
