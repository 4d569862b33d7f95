#!/usr/bin/env bash
# GPU check (docs/DESIGN.md §5 "Device check"): on a machine with one CUDA GPU, PyTorch,
# Triton, nvcc and the test tools but no network, build the extension with CUDA, run the
# CUDA and the Triton tests on the GPU, then the quick benchmarks if time is left, and
# write everything to one folder:
#
#   FASTMAML_CHECK_OUT=/some/dir bash benchmarks/gpu_check.sh          (default: $OUT, else ./gpu_check_out)
#   FASTMAML_CHECK_BUDGET=540  (seconds, default 540): the whole run's budget
#   bash benchmarks/gpu_check.sh --long   also the longer benchmarks (the full suite; budget
#                                         raised to FASTMAML_CHECK_LONG_BUDGET, default 1800 s)
#
# Budget: every stage gets the smaller of its own limit and the time left (less a reserve
# for the summary), so the run ends within the budget; a stage that cannot get its minimum
# is skipped and the summary says so. On an H100/H200 (16 cores): build ~60-90 s (this
# card's architecture only), CUDA tests ~30 s, Triton tests ~60-90 s (the ~192 kernel
# variants compile cold: ~205 s in one process, so the tests run in parallel shards that
# share one Triton cache), quick benchmarks with what is left.
#
# Triton: the kernels of fastmaml/triton are written for Triton >= 3.6 and < 4 when compiled
# for the GPU (what this check runs). Triton 3.6's interpreter (TRITON_INTERPRET=1, CPU
# tensors) cannot run them; the CPU test runs use the interpreter of Triton 3.9. The check
# records the version and refuses one outside [3.6, 4).
#
# Files written (at most one folder down):
#   log.txt           everything printed, with each stage's start time and duration
#   summary.txt       one line per stage: ok / FAILED / SKIPPED and seconds, then the total
#   tests-cuda.txt    pytest output of the CUDA-marked tests
#   tests-triton.txt  pytest output of the Triton tests (all shards)
#   RESULTS-gpu.md    the quick suite's tables with machine and command (when it ran)
#   bench/            the quick suite's JSON, Markdown table and PNG plot (when it ran)
set -uo pipefail
cd "$(dirname "$0")/.."
long=0
[ "${1:-}" = "--long" ] && long=1
out="${FASTMAML_CHECK_OUT:-${OUT:-./gpu_check_out}}"
mkdir -p "$out"
budget="${FASTMAML_CHECK_BUDGET:-540}"
[ $long -eq 1 ] && budget="${FASTMAML_CHECK_LONG_BUDGET:-1800}"
reserve=10  # for the summary at the end
start=$SECONDS
export PYTHONUNBUFFERED=1
: > "$out/summary.txt"
exec > >(tee -a "$out/log.txt") 2>&1

left() { echo $((budget - reserve - (SECONDS - start))); }

stage() {  # stage NAME LIMIT_S MIN_S CMD...: runs CMD with min(LIMIT_S, time left); skipped below MIN_S
  local name=$1 limit=$2 min=$3; shift 3
  local avail; avail=$(left)
  if [ "$avail" -lt "$min" ]; then
    echo "SKIPPED $name (${avail}s left, needs ${min}s)" | tee -a "$out/summary.txt"
    return 3
  fi
  [ "$avail" -lt "$limit" ] && limit=$avail
  local t0=$SECONDS
  echo "=== [$name] $(date -u +%H:%M:%S) limit ${limit}s: $*"
  timeout --kill-after=5 "$limit" "$@"
  local rc=$?
  local dt=$((SECONDS - t0))
  if [ $rc -eq 0 ]; then echo "ok      $name ${dt}s" >> "$out/summary.txt"
  else echo "FAILED  $name ${dt}s (exit $rc$([ $rc -eq 124 ] && echo ', timed out'))" >> "$out/summary.txt"; fi
  echo "=== [$name] exit $rc after ${dt}s ($(left)s left)"
  return $rc
}

finish() {
  echo "total   $((SECONDS - start))s of a ${budget}s budget" >> "$out/summary.txt"
  cat "$out/summary.txt"
  ! grep -q FAILED "$out/summary.txt"
  exit $?
}

# Build only the architecture of the card that is here (faster), unless told otherwise.
if [ -z "${FASTMAML_CUDA_ARCH:-}" ] && command -v nvidia-smi >/dev/null; then
  cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d '. ')
  [ -n "$cc" ] && export FASTMAML_CUDA_ARCH="$cc"
fi
export FASTMAML_CUDA=1
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$(mktemp -d)/triton}"  # shared by the test shards

stage smi 15 1 nvidia-smi
stage versions 30 5 python - <<'EOF'
import platform, sys
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NONE")
import triton
v = tuple(int(x) for x in triton.__version__.split(".")[:2])
print("triton", triton.__version__, "(supported for compiled kernels: >= 3.6, < 4)")
sys.exit(0 if (3, 6) <= v < (4, 0) else 1)
EOF
stage build 200 60 python -m pip install --no-build-isolation --no-deps -e . || {
  grep -q "^FAILED  build" "$out/summary.txt" || echo "FAILED  build (not run: no time left)" >> "$out/summary.txt"
  finish
}
stage info 30 5 python -m fastmaml info
stage tests-cuda 120 20 bash -c "python -m pytest -q -rs -m cuda tests 2>&1 | tee '$out/tests-cuda.txt'; exit \${PIPESTATUS[0]}"

# Triton tests in parallel shards (one pytest process each, one Triton cache): the cold
# compilation of the kernel variants dominates and is per process.
triton_shards() {
  local n=$1 ids="$out/.triton-ids"
  python -m pytest -q --collect-only -m triton tests 2>/dev/null | grep '::' > "$ids" || true
  local total; total=$(wc -l < "$ids")
  echo "triton tests: $total in $n shards"
  [ "$total" -gt 0 ] || { echo "no Triton test selected"; return 1; }
  local pids=() i
  for i in $(seq 0 $((n - 1))); do
    awk -v n="$n" -v i="$i" 'NR % n == i' "$ids" > "$out/.triton-shard-$i"
    [ -s "$out/.triton-shard-$i" ] || continue
    python -m pytest -q -rs -p no:cacheprovider $(cat "$out/.triton-shard-$i") > "$out/.triton-log-$i" 2>&1 &
    pids+=($!)
  done
  local rc=0 p
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  cat "$out"/.triton-log-* > "$out/tests-triton.txt"
  rm -f "$out"/.triton-shard-* "$out"/.triton-log-* "$ids"
  tail -n 3 "$out/tests-triton.txt"
  return $rc
}
export -f triton_shards
export out
shards=$(( $(nproc) / 2 )); [ "$shards" -gt 8 ] && shards=8; [ "$shards" -lt 1 ] && shards=1
stage tests-triton 240 60 bash -c "triton_shards $shards"

# Quick benchmarks, only with the time that is left.
stage bench-sgd-step 40 20 python -m fastmaml.bench --suite sgd_step --backend cuda --out "$out/sgd_cuda.json"
stage bench-mlp-triton 60 30 python -m fastmaml.bench --suite mlp_triton --reps 20 --out "$out/mlp_triton.json"
stage bench-quick 240 60 python -m fastmaml.bench --quick --device cuda --order second --no-progress \
  --out "$out/bench" --results-md "$out/RESULTS-gpu.md"
if [ $long -eq 1 ]; then
  stage bench-sgd-step-triton 120 20 python -m fastmaml.bench --suite sgd_step --backend triton --out "$out/sgd_triton.json"
  stage bench-full 1200 120 python -m fastmaml.bench --device cuda --no-progress \
    --out "$out/bench-full" --results-md "$out/RESULTS-gpu-full.md"
fi
finish
