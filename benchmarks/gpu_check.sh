#!/usr/bin/env bash
# GPU check (DESIGN.md §5 "Device check"): on a machine with one CUDA GPU, PyTorch, Triton
# and nvcc but no network, build the extension with CUDA, run the CUDA and Triton tests,
# run the quick benchmark suite on the GPU, and write everything to one folder:
#
#   FASTMAML_CHECK_OUT=/some/dir bash benchmarks/gpu_check.sh      (default: $OUT, else ./gpu_check_out)
#
# Files written (at most 8, flat, so the device tool brings them all back):
#   log.txt        everything printed, with the time each stage took
#   info.txt       nvidia-smi and `python -m fastmaml info`
#   tests.txt      pytest output of the CUDA- and Triton-marked tests on the GPU
#   bench.json     the quick benchmark suite's figures (machine, versions, commit)
#   bench.png      its plot
#   bench.md       its tables, ready for benchmarks/RESULTS.md
#   summary.txt    one line per stage: ok/FAILED and seconds
# Budget: under 8 minutes on an H100/H200 (16 cores): build ~1-2 min, tests ~2 min,
# benchmarks ~3 min; each stage has its own timeout so a hang cannot eat the lease.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${FASTMAML_CHECK_OUT:-${OUT:-./gpu_check_out}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
: > "$out/summary.txt"
exec > >(tee -a "$out/log.txt") 2>&1

stage() {  # stage NAME TIMEOUT_S CMD...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "=== [$name] $(date -u +%H:%M:%S) $*"
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  local dt=$((SECONDS - t0))
  if [ $rc -eq 0 ]; then echo "ok      $name ${dt}s" >> "$out/summary.txt"
  else echo "FAILED  $name ${dt}s (exit $rc)" >> "$out/summary.txt"; fi
  echo "=== [$name] exit $rc after ${dt}s"
  return $rc
}

# Build only the architecture of the card that is here (faster), unless told otherwise.
if [ -z "${FASTMAML_CUDA_ARCH:-}" ] && command -v nvidia-smi >/dev/null; then
  cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d '. ')
  [ -n "$cc" ] && export FASTMAML_CUDA_ARCH="$cc"
fi
export FASTMAML_CUDA=1 MAX_JOBS=16

{ nvidia-smi || true; } > "$out/info.txt" 2>&1
stage build 300 python -m pip install --no-build-isolation --no-deps -e . || { cat "$out/summary.txt"; exit 1; }
stage info 60 bash -c "python -m fastmaml info | tee -a '$out/info.txt'"
# CUDA-marked tests plus every Triton test, now on GPU tensors.
stage tests 240 bash -c "python -m pytest -q -rs -m 'cuda or triton' tests 2>&1 | tee '$out/tests.txt'; exit \${PIPESTATUS[0]}"
stage bench 300 python -m fastmaml.bench --quick --device cuda --out "$out/bench_run" \
  --json "$out/bench.json" --plot "$out/bench.png" --results-md "$out/bench.md"
cat "$out/summary.txt"
! grep -q FAILED "$out/summary.txt"
