#!/bin/bash
# Issue 20 on one lent GPU, in one call of under 10 minutes (the device tool's limit per command; a session has
# 15 minutes of device time in all, the machine's start included, and every machine starts bare):
#     bash bench/gpu_session.sh "$OUT"          # pass 1: the small reproduction, guarded (below)
#     bash bench/gpu_session.sh "$OUT" bench    # pass 2: what bounds a small stage-3 step (profiler: eager at
#                                               # batch 64 and 128, compiled at 64) and bench_train's samples/s, MFU
# Pass 1, so that the run cannot be wasted:
#   1. preflight (<= 10 s): packages, project modules, the GPU, disk, memory; a failure ends the call at once.
#   2. `python reproduce.py --preset=small --seeds=0` starts (its first minute is data generation on the CPUs),
#      and beside it the smoke checks use the GPU: tests/test_cuda.py and the whole pipeline at `micro` on the
#      GPU (stage 0, every recipe, both VLAs, every evaluation, the tables). If the micro pipeline fails, the
#      small run is stopped and the call ends (the device time left can then go to a fixed rerun).
#   3. the small run gets the rest of the 10 minutes; its page and results.json are rewritten as steps finish,
#      so a run cut at its limit still returns every finished comparison.
# Set GEM_COMMIT=<the commit> when the tree was copied without .git: run.json and the page then name it.
# A CPU check of the script itself: GEM_PREFLIGHT=--cuda=false GEM_SESSION_LIMIT=240 PYTHON=.venv/bin/python bash ...
# What comes back (the device tool returns at most 8 files, 2 folders down): summary.txt (one line per part),
# machine.txt, the parts' logs, and small_runs.tar.gz: the small run's results/ (README.md, results.json,
# figures), every run's log.jsonl, run.json, step log and evaluation results.json, the data steps' logs, and
# the micro smoke run's page (commit them as results/small/).
set -u
OUT=$(realpath -m "${1:-/tmp/gpu_session}")  # before the cd below
PASS=${2:-reproduce}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}
export PYTHONUNBUFFERED=1
T0=$(date +%s)
LIMIT=${GEM_SESSION_LIMIT:-570}  # seconds for the whole pass; the call's own limit is 600
W=${GEM_WORK:-/tmp/gem_small}   # not under $OUT: data and checkpoints stay on the machine
left() { echo $(( LIMIT - ($(date +%s) - T0) )); }
part() {  # part NAME SECONDS CMD...: run with a limit, keep its log, add its last line to the summary; -> its rc
  local name=$1 limit=$2; shift 2
  local t=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name (rc $rc, $(( $(date +%s) - t )) s): $(grep -v '^\s*$' "$OUT/$name.log" | tail -1 | cut -c1-300)" | tee -a "$OUT/summary.txt"
  return $rc
}
{ nvidia-smi; $PY -c "import torch, sys; print(sys.version); print('torch', torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
  git log -1 --oneline 2>/dev/null || echo "commit (GEM_COMMIT): ${GEM_COMMIT:-unknown}"; nproc; free -g; df -h /tmp; } > "$OUT/machine.txt" 2>&1
mkdir -p "$W"
part preflight 30 $PY bench/preflight.py --work="$W" ${GEM_PREFLIGHT:-} || { echo "stopped: preflight failed" | tee -a "$OUT/summary.txt"; exit 1; }
case "$PASS" in
reproduce)
  timeout "$(( $(left) - 15 ))" $PY reproduce.py --preset=small --seeds=0 --data=$W/data --runs=$W/runs \
      --results=$W/results > "$OUT/reproduce.log" 2>&1 &
  SMALL=$!
  part cuda_tests 150 $PY -m pytest -q -rA -p no:cacheprovider tests/test_cuda.py &
  TESTS=$!
  part smoke 150 $PY reproduce.py --preset=micro --seeds=0 --jobs=4 --data=$W/micro/data --runs=$W/micro/runs \
      --results=$W/micro/results
  SMOKE=$?
  wait $TESTS
  if [ $SMOKE -ne 0 ]; then
    kill -TERM $SMALL 2>/dev/null; wait $SMALL
    echo "stopped: the micro pipeline failed on the GPU (smoke.log); the small run was stopped" | tee -a "$OUT/summary.txt"
  else
    wait $SMALL
    RC=$?
    echo "reproduce (rc $RC, $(( $(date +%s) - T0 )) s since the start): $(grep -v '^\s*$' "$OUT/reproduce.log" | tail -1 | cut -c1-300)" \
      | tee -a "$OUT/summary.txt"
  fi
  tar czf "$OUT/small_runs.tar.gz" -C $W --exclude='*.safetensors' --exclude='*.pt' --exclude='*.npy' --exclude='images' \
      --exclude='depth' --exclude='states' --exclude='shards' --exclude='cache' --exclude='*.npz' --exclude='gifs' \
      $(cd $W && ls -d results micro/results data.log data-demos.log 2>/dev/null) \
      $(cd $W && find runs -name 'log.jsonl' -o -name 'run.json' -o -name '*.log' -o -name 'results.json' -o -name 'results.md') 2>/dev/null
  ;;
bench)
  # the compiled numbers come from the profiler's stage-3 step (compiling every stage of bench_train would take
  # minutes); the first H200 run's compile of it at batch 64 did not finish within 100 s: it gets 300 here
  part profile_b64_eager 50 $PY bench/profile_step.py --preset=small --batch_size=64 --steps=10
  part profile_b128_eager 50 $PY bench/profile_step.py --preset=small --batch_size=128 --steps=10
  part profile_b64_compiled 300 $PY bench/profile_step.py --preset=small --batch_size=64 --steps=10 --compile=true
  part bench_train "$(( $(left) - 5 ))" $PY bench/bench_train.py --preset=small --batches=64,128 --modes=eager --steps=30 \
      --out=/tmp/bench_train
  cp /tmp/bench_train/bench_train.md "$OUT/" 2>/dev/null
  ;;
*) echo "unknown pass $PASS: reproduce or bench"; exit 2 ;;
esac
echo "done in $(( $(date +%s) - T0 )) s: $OUT/summary.txt" | tee -a "$OUT/summary.txt"
