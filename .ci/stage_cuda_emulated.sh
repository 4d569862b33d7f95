#!/usr/bin/env bash
# CI stage: every CUDA kernel executed on the CPU.
#
#   1. copies the tracked (and not ignored) files of this checkout to a temporary folder
#      and builds the emulated CUDA variant there (FASTMAML_CUDA=emulate, see
#      csrc/common/cuda_emulation.h): the normal in-place build is not touched;
#   2. runs tests/emulated against it: the emulated twins of every @pytest.mark.cuda
#      test, the emulator's own tests, and the race check, which is on for every emulated
#      launch (the coverage list at the end names every __global__ kernel with its
#      launch count; a kernel with none, or with a race, fails the stage);
#   3. the GPU dry run: the device check's test selection (benchmarks/gpu_check.sh:
#      -m 'cuda or triton') executed with PyTorch made to report a CUDA device and the
#      emulated build standing in for it (tests/emulated/gpu_dry_run.py).
#
# Uses the active Python environment (torch, pytest, pybind11, setuptools); call it from
# the repository root or anywhere: `bash .ci/stage_cuda_emulated.sh`. Budget: 6 minutes
# on a 2-core machine (build ~1-2 min, tests ~2 min, dry run ~1 min); each step is timed.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
t0=$SECONDS
step() { echo "=== [cuda-emulated] $1 ($((SECONDS - t0)) s)"; }

step "copy the checkout to $work/src"
mkdir -p "$work/src"
(cd "$repo" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf -) | tar -C "$work/src" -xf -
cd "$work/src"
python -c "import pybind11, setuptools" 2>/dev/null || python -m pip install -q pybind11 setuptools

step "build the emulated CUDA module (FASTMAML_CUDA=emulate)"
FASTMAML_CUDA=emulate FASTMAML_CPU_ARCH="${FASTMAML_CPU_ARCH:-native}" \
  python setup.py -q build_ext --inplace > "$work/build.log" 2>&1 || { tail -n 60 "$work/build.log"; exit 1; }
export PYTHONPATH="$work/src${PYTHONPATH:+:$PYTHONPATH}"
# the tests below must see this build, not another fastmaml of the environment
python - "$work/src" <<'EOF'
import sys
import fastmaml, fastmaml._C as C
assert fastmaml.__file__.startswith(sys.argv[1]), fastmaml.__file__
assert C.cuda_emulated, "the module built is not the emulated variant"
EOF
python -m fastmaml info

step "emulated kernels, their coverage and the race check (tests/emulated)"
FASTMAML_REQUIRE_EMULATED=1 python -m pytest -q -p no:cacheprovider -rs tests/emulated

step "GPU dry run: the device check's selection with torch reporting a CUDA device"
PYTHONPATH="$work/src/tests/emulated:$PYTHONPATH" FASTMAML_REQUIRE_EMULATED=1 \
  python -m pytest -q -p no:cacheprovider -rs -p gpu_dry_run -m 'cuda or triton' tests

step "done"
