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
# Env:   SANITIZER_TESTS="..." replaces the list of test paths; SKIP_TSAN=1 skips TSAN.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
t0=$SECONDS

copy_tree() {  # $1: destination
  tar -C "$root" --exclude=./.git --exclude=./build --exclude='*.so' --exclude='*.so.config' \
      --exclude=__pycache__ --exclude=.hypothesis --exclude=.pytest_cache -cf - . | tar -C "$1" -xf -
}

build() {  # $1: tree, $2: sanitizer flags
  (cd "$1" && FASTMAML_CUDA=0 FASTMAML_CPU_ARCH="" CFLAGS="$2 -fno-omit-frame-pointer -g" LDFLAGS="$2" \
     python setup.py build_ext --inplace -q >"$1/build.log" 2>&1) || { cat "$1/build.log"; exit 1; }
}

# The tests that reach the C++ kernels: the op tests (tests/ops/ in the per-op layout,
# else the op test files), the property tests of the ops and the reliability cases
# that run the fused MLP kernel.
if [[ -n "${SANITIZER_TESTS:-}" ]]; then
  read -r -a tests <<<"$SANITIZER_TESTS"
else
  tests=()
  if [[ -d "$root/tests/ops" ]]; then
    tests+=(tests/ops)
  else
    for f in test_sgd_step.py test_mlp_ops.py test_maml_mlp.py test_batch_norm.py test_maml_dispatch.py; do
      [[ -f "$root/tests/$f" ]] && tests+=("tests/$f")
    done
  fi
  tests+=(tests/property/test_prop_sgd_step.py tests/property/test_prop_mlp_ops.py
          tests/property/test_prop_batch_norm.py tests/reliability/test_case03_nonfinite_params.py
          tests/reliability/test_case05_fused_autograd_contract.py tests/reliability/test_case07_strided_inputs.py)
fi

# --- ASan + UBSan ------------------------------------------------------------------------
asan="$work/asan"
mkdir -p "$asan"
copy_tree "$asan"
build "$asan" "-fsanitize=address,undefined -fno-sanitize-recover=undefined"
echo "sanitizers: ASan+UBSan build $((SECONDS - t0)) s"
t1=$SECONDS
libasan="$(gcc -print-file-name=libasan.so)"
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
  LD_PRELOAD="$libasan" python -m pytest -q -x -p no:cacheprovider -m "not triton" "${tests[@]}" 2>&1 | tail -n 5
  exit "${PIPESTATUS[0]}"
)
echo "sanitizers: ASan+UBSan tests $((SECONDS - t1)) s"

# --- TSan --------------------------------------------------------------------------------
# ThreadSanitizer on the OpenMP kernels: libgomp is not instrumented, so TSan cannot see
# its barriers and would report every write before a parallel region read inside it. The
# kernels are therefore run by a driver (tsan_driver.py) under OMP with the GOMP barrier
# replaced by... nothing: we run with OMP_NUM_THREADS=2 and suppress reports whose stack
# lies in libgomp/libtorch, so what remains are races between two of our own threads.
if [[ "${SKIP_TSAN:-0}" != "1" ]]; then
  t2=$SECONDS
  tsan="$work/tsan"
  mkdir -p "$tsan"
  copy_tree "$tsan"
  build "$tsan" "-fsanitize=thread"
  echo "sanitizers: TSan build $((SECONDS - t2)) s"
  libtsan="$(gcc -print-file-name=libtsan.so)"
  printf 'called_from_lib:libgomp.so\ncalled_from_lib:libtorch_cpu.so\ncalled_from_lib:libc10.so\ncalled_from_lib:libpython\n' \
    >"$tsan/tsan.supp"
  (
    cd "$tsan"
    export PYTHONPATH="$tsan" OMP_NUM_THREADS=2
    export TSAN_OPTIONS="halt_on_error=1:report_signal_unsafe=0:suppressions=$tsan/tsan.supp:exitcode=66"
    LD_PRELOAD="$libtsan" python "$root/.ci/tsan_driver.py"
  )
  echo "sanitizers: TSan run $((SECONDS - t2)) s"
fi
echo "sanitizers: clean, $((SECONDS - t0)) s in all"
