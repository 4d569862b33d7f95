#!/usr/bin/env bash
# GPU check (docs/DESIGN.md §5 "Device check"): on a machine with one CUDA GPU, PyTorch, Triton
# and nvcc but no network, build the extension with CUDA, run the CUDA and Triton tests,
# run the quick benchmark suite on the GPU, and write everything to one folder:
#
#   FASTMAML_CHECK_OUT=/some/dir bash benchmarks/gpu_check.sh      (default: $OUT, else ./gpu_check_out)
#
# Files written (at most 8, at most one folder down, so the device tool brings them all back):
#   log.txt          everything printed (nvidia-smi, `python -m fastmaml info`, build, the
#                    sgd_step and Triton-MLP micro-benchmarks), with the time each stage took
#   tests.txt        pytest output of the CUDA- and Triton-marked tests on the GPU
#   summary.txt      one line per stage: ok/FAILED and seconds
#   RESULTS-gpu.md   the quick suite's tables with machine and command, for benchmarks/RESULTS.md
#   bench/           the quick suite's JSON, Markdown table and PNG plot
# Budget: under 8 minutes on an H100/H200 (16 cores): build ~1-2 min (only this card's
# architecture), tests ~2 min, benchmarks ~4 min; each stage has its own timeout so a hang
# cannot eat the lease.
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

stage smi 30 nvidia-smi
stage build 300 python -m pip install --no-build-isolation --no-deps -e . || { cat "$out/summary.txt"; exit 1; }
stage info 60 python -m fastmaml info
# CUDA-marked tests plus every Triton test, now on GPU tensors.
stage tests 240 bash -c "python -m pytest -q -rs -m 'cuda or triton' tests 2>&1 | tee '$out/tests.txt'; exit \${PIPESTATUS[0]}"
stage sgd_step 60 python -m fastmaml.bench --suite sgd_step --backend cuda --out /tmp/sgd_cuda.json
stage sgd_step_triton 60 python -m fastmaml.bench --suite sgd_step --backend triton --out /tmp/sgd_triton.json
stage mlp_triton 90 python -m fastmaml.bench --suite mlp_triton --reps 50 --out /tmp/mlp_triton.json
stage bench 300 python -m fastmaml.bench --quick --device cuda --order second --no-progress \
  --out "$out/bench" --results-md "$out/RESULTS-gpu.md"
cat "$out/summary.txt"
! grep -q FAILED "$out/summary.txt"
