#!/bin/bash
# Issue 13 on one lent GPU, in one call of under 10 minutes (the device tool's limit per command; a session has
# 15 minutes of device time in all, the machine's start included, and every machine starts bare):
#     bash bench/gpu_session.sh "$OUT"          # pass 1: what bounds a small stage-3 step, then the whole
#                                               # `python reproduce.py --preset=small --seeds=0`, wall-timed
#     bash bench/gpu_session.sh "$OUT" bench    # pass 2 (a later session): batch 128 and compiled profiles, and
#                                               # samples/s, TFLOP/s, MFU per stage at batch 64 and 128, eager
# Set GEM_COMMIT=<the commit> when the tree was copied without .git: run.json and the page then name it.
# Each part has its own time limit, so one slow part cannot eat the others' time, and summary.txt gets the last
# line of each. What comes back (the device tool returns at most 8 files, 2 folders down): summary.txt,
# machine.txt, the parts' logs, and pass 1's results/small page, results.json and every run's log.jsonl and
# step log in small_runs.tar.gz (commit them as results/small/).
set -u
OUT=$(realpath -m "${1:-/tmp/gpu_session}")  # before the cd below
PASS=${2:-reproduce}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}
export PYTHONUNBUFFERED=1
T0=$(date +%s)
part() {  # part NAME SECONDS CMD...: run with a limit, keep its log, add its last line to the summary
  local name=$1 limit=$2; shift 2
  local t=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name (rc $rc, $(( $(date +%s) - t )) s): $(grep -v '^\s*$' "$OUT/$name.log" | tail -1 | cut -c1-300)" | tee -a "$OUT/summary.txt"
}
{ nvidia-smi; $PY -c "import torch, sys; print(sys.version); print('torch', torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
  git log -1 --oneline || echo "commit (GEM_COMMIT): ${GEM_COMMIT:-unknown}"; nproc; } > "$OUT/machine.txt" 2>&1
case "$PASS" in
reproduce)
  part profile_b64_eager 60 $PY bench/profile_step.py --preset=small --batch_size=64 --steps=10
  W=/tmp/gem_small  # not under $OUT: data and checkpoints stay on the machine
  part reproduce $(( 570 - ($(date +%s) - T0) )) $PY reproduce.py --preset=small --seeds=0 --data=$W/data --runs=$W/runs \
      --results=$W/results
  tar czf "$OUT/small_runs.tar.gz" -C $W --exclude='*.safetensors' --exclude='*.pt' --exclude='*.npy' --exclude='images' \
      --exclude='depth' --exclude='states' --exclude='shards' --exclude='cache' --exclude='*.npz' --exclude='gifs' \
      results $(cd $W && find runs -name 'log.jsonl' -o -name 'run.json' -o -name '*.log' -o -name 'results.json') 2>/dev/null
  ;;
bench)
  # compiling costs ~a minute per stage and run, so the compiled numbers come from the profiler's stage-3 step
  part profile_b128_eager 60 $PY bench/profile_step.py --preset=small --batch_size=128 --steps=10
  part profile_b64_compiled 150 $PY bench/profile_step.py --preset=small --batch_size=64 --steps=10 --compile=true
  part profile_b128_compiled 150 $PY bench/profile_step.py --preset=small --batch_size=128 --steps=10 --compile=true
  part bench_train 190 $PY bench/bench_train.py --preset=small --batches=64,128 --modes=eager --steps=30 \
      --out=/tmp/bench_train
  cp /tmp/bench_train/bench_train.md "$OUT/" 2>/dev/null
  ;;
*) echo "unknown pass $PASS: reproduce or bench"; exit 2 ;;
esac
echo "done in $(( $(date +%s) - T0 )) s: $OUT/summary.txt" | tee -a "$OUT/summary.txt"
