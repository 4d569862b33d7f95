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
"""

from __future__ import annotations

import ctypes
import gc
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


def _malloc_trim() -> None:
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
    _malloc_trim()
    base = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    out = fn()
    sync(out)
    hwm = _status_kb("VmHWM")
    return max(0, hwm - base) * 1024, "RSS high-water growth", out
