"""Timing and peak-memory measurement of one call: the one timer of every benchmark.

Timing: ``time_call`` runs the call and waits for its result (CUDA: events recorded on
the current stream around the call, then synchronised; JAX: ``block_until_ready``;
CPU: ``perf_counter``). ``repeat`` times a call many times over, each call on its own
(the op micro-suites: ``python -m fastmaml.bench --suite sgd_step|batch_norm|mlp_triton``).

Peak memory of one meta-step, as growth above what was allocated before it:
- CUDA tensors: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``,
  minus ``memory_allocated`` before the step (PyTorch's caching allocator only; a JAX
  method on a GPU reports ``n/a``: JAX pre-allocates its own pool).
- CPU: the process's resident-set high-water mark. Freed heap is first returned to the
  kernel (``malloc_trim``), the high-water mark is reset to the current RSS by writing
  ``5`` to ``/proc/self/clear_refs``, and after the step the growth is
  ``VmHWM − VmRSS(before)``. It counts every allocator in the process (PyTorch, XLA,
  Python), so it is comparable across frameworks.

With ``--method-timeout`` (isolation, see isolation.py) each method runs in a fresh child
process, so its figure is measured there: the same rule, with nothing left in the process
by methods run before it.

The machine's rate: ``matmul_rate`` times a float32 n×n ``torch.mm`` (1024 by default:
2·n³ FLOPs, median of several calls) on a given number of torch threads, restoring the
caller's setting; ``machine_rate`` does it on one thread and on every usable core
(``os.sched_getaffinity``): the yardstick of the tables' "% of sgemm" column.
"""

from __future__ import annotations

import ctypes
import gc
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line")


def malloc_trim() -> None:
    """Return freed heap to the kernel (glibc; elsewhere nothing)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: the measurement is then an upper bound of the growth
        pass


def cpu_peak_supported() -> tuple[bool, str]:
    try:
        _status_kb("VmHWM")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True, ""
    except (OSError, RuntimeError) as exc:
        return False, f"cannot reset the RSS high-water mark ({exc})"


def time_call(fn: Callable[[], Any], sync: Callable[[Any], None], device: torch.device,
              framework: str) -> tuple[float, Any]:
    """Seconds one call takes until its result is ready, and the result."""
    if device.type == "cuda" and framework == "torch":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        sync(out)
        end.synchronize()
        return start.elapsed_time(end) / 1e3, out
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    sync(out)
    return time.perf_counter() - t0, out


def _no_sync(_out: Any) -> None:
    return None


def repeat(fn: Callable[[], Any], reps: int, warmup: int, device: torch.device) -> list[float]:
    """Seconds of each of ``reps`` calls of ``fn``, each timed on its own by ``time_call``
    after ``warmup`` untimed calls (a torch call; on CUDA, synchronised around each)."""
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return [time_call(fn, _no_sync, device, "torch")[0] for _ in range(reps)]


def peak_growth(fn: Callable[[], Any], sync: Callable[[Any], None], device: torch.device,
                framework: str) -> tuple[int | None, str, Any]:
    """Peak memory growth in bytes during one call (or None), what was measured, the result."""
    if device.type == "cuda":
        if framework != "torch":
            out = fn()
            sync(out)
            return None, "n/a (JAX allocates from its own pre-allocated pool)", out
        torch.cuda.synchronize(device)
        gc.collect()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        sync(out)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base, "cuda max_memory_allocated growth", out
    ok, why = cpu_peak_supported()
    if not ok:
        out = fn()
        sync(out)
        return None, why, out
    gc.collect()
    malloc_trim()
    base = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    out = fn()
    sync(out)
    hwm = _status_kb("VmHWM")
    return max(0, hwm - base) * 1024, "RSS high-water growth", out


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask; ``os.cpu_count()`` where
    the platform has no affinity call)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def matmul_rate(threads: int, n: int = 1024, reps: int = 7) -> float:
    """GFLOP/s of a float32 ``n×n @ n×n`` ``torch.mm`` on ``threads`` torch threads: 2·n³
    FLOPs over the median of ``reps`` calls (after 2 untimed ones). The caller's thread
    count is restored."""
    for name, v in (("threads", threads), ("n", n), ("reps", reps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    before = torch.get_num_threads()
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    out = torch.empty(n, n)
    try:
        torch.set_num_threads(threads)
        for _ in range(2):
            torch.mm(a, b, out=out)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.mm(a, b, out=out)
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return 2.0 * n ** 3 / statistics.median(times) / 1e9


def machine_rate(n: int = 1024, reps: int = 7) -> dict:
    """The float32 sgemm rate of this machine now: on 1 thread and on every usable core."""
    cores = usable_cores()
    return {"n": n, "reps": reps, "gflops_1thread": matmul_rate(1, n, reps), "threads_all": cores,
            "gflops_all": matmul_rate(cores, n, reps)}
