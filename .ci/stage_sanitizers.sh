#!/usr/bin/env bash
# CI stage: the C++ extension built with AddressSanitizer + UndefinedBehaviorSanitizer,
# and the tests that run its kernels under it; then its OpenMP kernels under
# ThreadSanitizer (see the TSAN part below for what that covers).
#
# The sanitized build goes into a temporary copy of the tree, so the normal in-place
# build is untouched. CPU only (FASTMAML_CUDA=0: the CUDA kernels cannot run here).
# Python itself is not instrumented, so the sanitizer runtime is preloaded
# (LD_PRELOAD) and leak detection is off (the interpreter's own allocations at exit
# would be reported). Any ASan/UBSan report aborts the test process: the stage fails.
#
# Usage: .ci/stage_sanitizers.sh            (from any directory; python = the CI venv)
# Env:   SANITIZER_TESTS="..." replaces the list of test paths; RUN_ASAN=0 skips the ASan+UBSan
#        part; RUN_TSAN=1 adds the TSan
#        part (off by default: on a shared 2-core runner its build alone takes minutes).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
t0=$SECONDS

copy_tree() {  # $1: destination
  tar -C "$root" --exclude=./.git --exclude=./build --exclude='*.so' --exclude='*.so.config' \
      --exclude=__pycache__ --exclude=.hypothesis --exclude=.pytest_cache -cf - . | tar -C "$1" -xf -
}

build() {  # $1: tree, $2: sanitizer flags, $3: a symbol the instrumented module must import
  # CXXFLAGS for the C++ sources (setuptools compiles them with its C++ compiler line), CFLAGS
  # for any C source, LDFLAGS for the link (the sanitizer runtime)
  # -march=native as in the normal build (so the AVX-512 code that runs is the code
  # checked); -O1 (FASTMAML_CXX_OPT): instrumented -O3 compiles take minutes; -O1 keeps the
  # instrumentation (and the checks) and compiles several times faster; -j: all cores
  (cd "$1" && FASTMAML_CUDA=0 FASTMAML_CXX_OPT=-O1 CFLAGS="$2 -fno-omit-frame-pointer -g" \
     CXXFLAGS="$2 -fno-omit-frame-pointer -g" LDFLAGS="$2" \
     python setup.py build_ext --inplace -q -j "$(nproc)" >"$1/build.log" 2>&1) || { cat "$1/build.log"; exit 1; }
  # a build that silently dropped the flags would make the stage pass for nothing
  # (the symbol table is read first: `nm | grep -q` under pipefail fails when grep exits
  # early and nm gets SIGPIPE)
  local syms
  syms="$(nm -D "$1"/fastmaml/_C*.so)"
  grep -q "$3" <<<"$syms" || { echo "sanitizers: $1 is not instrumented ($3 missing)"; exit 1; }
}

# The tests that reach the C++ kernels: the op tests (tests/ops, tests/csrc), the
# property tests of the ops and the reliability cases that run the fused MLP kernel
# (Triton's are deselected: its interpreter runs no C++ of ours and is slow). The fused
# BatchNorm kernels run under it through the property test (forward, backward, double
# backward on random shapes); tests/ops/test_batch_norm.py is left out for time (5 min
# under ASan on 2 cores): SANITIZER_TESTS="tests/ops" runs every op test.
if [[ -n "${SANITIZER_TESTS:-}" ]]; then
  read -r -a tests <<<"$SANITIZER_TESTS"
else
  tests=(tests/ops/test_sgd_step.py tests/ops/test_sgd_step_checks.py tests/ops/test_sgd_step_lean.py
         tests/ops/test_mlp.py tests/ops/test_maml_mlp.py tests/ops/test_registry.py tests/csrc
         tests/property/test_prop_sgd_step.py tests/property/test_prop_mlp_ops.py tests/property/test_prop_batch_norm.py
         tests/reliability/test_case03_nonfinite_params.py tests/reliability/test_case05_fused_autograd_contract.py
         tests/reliability/test_case07_strided_inputs.py)
fi

# The build's own requirements (pip's isolated build environment does not leave them in
# the CI venv)
python -c "import pybind11, setuptools" 2>/dev/null || pip install -q "setuptools>=64" "pybind11>=2.11"

# --- ASan + UBSan ------------------------------------------------------------------------
if [[ "${RUN_ASAN:-1}" == "1" ]]; then
asan="$work/asan"
mkdir -p "$asan"
copy_tree "$asan"
build "$asan" "-fsanitize=address,undefined -fno-sanitize-recover=undefined" __asan_report
echo "sanitizers: ASan+UBSan build $((SECONDS - t0)) s"
t1=$SECONDS
# libstdc++ is preloaded with libasan: Python does not link it, and ASan's __cxa_throw
# interceptor must find it at start-up (else the first C++ exception aborts)
libasan="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libstdc++.so)"
(
  cd "$asan"
  export PYTHONPATH="$asan" FASTMAML_HYPOTHESIS_PROFILE="${FASTMAML_HYPOTHESIS_PROFILE:-ci}"
  export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:alloc_dealloc_mismatch=0:detect_odr_violation=0"
  export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
  # the instrumented module must be the one imported
  LD_PRELOAD="$libasan" python - <<'PY'
import fastmaml._C as C, os
assert C.__file__.startswith(os.environ["PYTHONPATH"]), C.__file__
PY
  # -s: a sanitizer report goes to stderr right before the abort; pytest's capture would lose it
  LD_PRELOAD="$libasan" python -m pytest -q -x -s -p no:cacheprovider -m "not triton" "${tests[@]}" \
    >"$work/asan.log" 2>&1 || { grep -v '^  File' "$work/asan.log" | tail -n 80; exit 1; }
  tail -n 1 "$work/asan.log"
)
echo "sanitizers: ASan+UBSan tests $((SECONDS - t1)) s"
fi

# --- TSan --------------------------------------------------------------------------------
# ThreadSanitizer on the OpenMP kernels: a TSan build of the extension, and a driver that
# runs every OpenMP kernel (sgd_step forward/backward, the MLP loss/grad and HVP, the
# fused MAML step, the fused BatchNorm through its double backward) with several tasks
# per call and two OpenMP threads. libgomp and PyTorch are not instrumented; reports whose
# stack lies in them are suppressed (TSan cannot see libgomp's barriers, so without the
# suppression it would flag the region's start and end). A race between two of the
# kernels' own threads on their own data is still reported and fails the stage.
# Measured on this project's CPU (gcc 12, the distribution's libgomp): the run reports a race
# between a team thread's read of the items table in sgd_step's forward and the main thread's
# free of it after the parallel region, i.e. across the region's closing barrier, which lives in
# libgomp and is invisible to TSan. That is the limit of TSan with an uninstrumented libgomp: a
# clean TSan run needs a TSan-built libgomp (not available here), so this part stays by hand
# (RUN_TSAN=1) and is not a CI gate; the CUDA kernels' races are checked by the emulated build.
if [[ "${RUN_TSAN:-0}" == "1" ]]; then
  t2=$SECONDS
  tsan="$work/tsan"
  mkdir -p "$tsan"
  copy_tree "$tsan"
  build "$tsan" "-fsanitize=thread" __tsan_
  echo "sanitizers: TSan build $((SECONDS - t2)) s"
  printf 'called_from_lib:libgomp.so\ncalled_from_lib:libtorch_cpu.so\ncalled_from_lib:libtorch_python.so\ncalled_from_lib:libc10.so\n' >"$tsan/tsan.supp"
  cat >"$tsan/tsan_driver.py" <<'PY'
"""Drive every OpenMP kernel of the extension with several tasks per call (so the
parallel regions really split), in both dtypes."""
import torch
import fastmaml
from fastmaml import ops

torch.manual_seed(0)
for dtype in (torch.float32, torch.float64):
    T = 8
    p = [torch.randn(T, 300, 70, dtype=dtype), torch.randn(T, 70, dtype=dtype)]
    g = [torch.randn_like(t) for t in p]
    for lr in (0.1, torch.tensor(0.1, dtype=dtype), [torch.rand(300, 70, dtype=dtype), torch.rand(70, dtype=dtype)]):
        ops.sgd_step(p, g, lr, backend="cpu")
    leaves = [t.clone().requires_grad_(True) for t in p]
    sum(o.sum() for o in ops.sgd_step(leaves, g, 0.1, backend="cpu")).backward()
    dims = [3, 16, 16, 2]
    ws = [torch.randn(T, dims[i + 1], dims[i], dtype=dtype) for i in range(3)]
    bs = [torch.randn(T, dims[i + 1], dtype=dtype) for i in range(3)]
    x = torch.randn(T, 10, 3, dtype=dtype)
    y = torch.randn(T, 10, 2, dtype=dtype)
    for act in ("relu", "tanh"):
        ops.mlp_loss_and_grad(ws, bs, x, y, activation=act, backend="cpu")
        ops.mlp_hvp(ws, bs, x, y, ws, bs, activation=act, backend="cpu")
        w0 = [w[0].clone().requires_grad_(True) for w in ws]
        b0 = [b[0].clone().requires_grad_(True) for b in bs]
        lr = torch.tensor(0.05, dtype=dtype, requires_grad=True)
        ops.maml_mlp(w0, b0, x, y, x, y, lr, steps=3, activation=act, backend="cpu").backward()
    bn = fastmaml.ops.batch_norm if hasattr(fastmaml.ops, "batch_norm") else fastmaml.batch_norm.batch_norm
    xb = torch.randn(16, 8, 6, 6, dtype=dtype, requires_grad=True)
    wb = torch.rand(8, dtype=dtype, requires_grad=True)
    bb = torch.rand(8, dtype=dtype, requires_grad=True)
    out = bn(xb, wb, bb, 1e-5)
    gx, = torch.autograd.grad(out.square().sum(), xb, create_graph=True)
    gx.sum().backward()
print("tsan driver: every OpenMP kernel ran")
PY
  (
    cd "$tsan"
    export PYTHONPATH="$tsan" OMP_NUM_THREADS=2
    export TSAN_OPTIONS="halt_on_error=1:report_signal_unsafe=0:suppressions=$tsan/tsan.supp:exitcode=66"
    LD_PRELOAD="$(gcc -print-file-name=libtsan.so)" python tsan_driver.py
  )
  echo "sanitizers: TSan run $((SECONDS - t2)) s"
fi
echo "sanitizers: clean, $((SECONDS - t0)) s in all"
