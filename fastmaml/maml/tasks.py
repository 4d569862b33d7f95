"""Mapping the per-task computation over the tasks of a meta-batch (``task_map``).

* ``"vmap"``: one batched call per step. Best for MLPs and other small dense models
  (per-task work is tiny, Python and dispatch overhead dominate).
* ``"loop"``: the same per-task computation in a Python loop, results stacked. On CPU,
  vmap over convolutions (tasks folded into channel groups) is slower than one ordinary
  convolution per task, so ``task_map="auto"`` picks the loop for convolutional models
  on CPU (the rule is :func:`fastmaml.maml.dispatch.choose_task_map`). Both give the
  same numbers.

On CPU the loop runs its tasks concurrently, one per worker thread with one intra-op
thread each (``task_threads``, :func:`run_tasks`), when ``fn`` is thread-safe
(:func:`module_fn`, which the ``MAML`` wrapper uses) and each task's inputs are small
(at most ``SMALL_TASK_INPUT`` elements); ``task_threads="auto"`` uses at most the cores
left by other processes (:func:`usable_cores`), and the meta-step's ops run on at most that
many intra-op threads (:func:`op_threads`, :func:`confined`). Measurements: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import contextlib
import copy
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch.utils import _pytree as pytree

from fastmaml.maml.problem import PureFn
from fastmaml.maml.sequential_fn import sequential_fn

TASK_MAPS = ("auto", "vmap", "loop")

# --- concurrent tasks on CPU ---------------------------------------------------------
# The per-task loop on CPU runs its tasks concurrently on a pool of worker threads, one
# intra-op thread each, instead of one task after another with every op split across the
# cores: a task's ops on a small image batch (Omniglot: 5 or 75 images of 28x28) are too
# small to split well (measured: benchmarks/RESULTS.md, "Measurements formerly in
# fastmaml/generic.py"). PyTorch's ops release the GIL, so the workers run in parallel;
# each task's numbers are computed exactly as in the serial loop, on one thread (so they
# do not depend on the number of workers).
_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0
_POOL_LOCK = threading.Lock()
_WORKER_NAME = "fastmaml-task"

# Per-task inputs up to this many elements count as small enough to run tasks
# concurrently (Omniglot's 75 x 1x28x28 query set: 58,800). Larger ones (miniImageNet:
# 75 x 3x84x84 = 1.6M) stay in the serial loop: their ops already use the cores (threads
# gain little there) and concurrent tasks would hold several tasks'
# activations at once, breaking the one-step-of-activations memory bound.
SMALL_TASK_INPUT = 1 << 18


def task_pool(n: int) -> ThreadPoolExecutor:
    """The shared pool of ``n`` task workers, each set to one intra-op thread.

    ``torch.set_num_threads`` in a worker also changes the process-wide default that
    threads created later start from, so the pool is filled at once (a barrier makes
    every worker run its initializer) and the caller's setting is restored after."""
    global _POOL, _POOL_SIZE
    with _POOL_LOCK:
        if _POOL is not None and _POOL_SIZE == n:
            return _POOL
        if _POOL is not None:
            _POOL.shutdown(wait=True)
        caller = torch.get_num_threads()
        barrier = threading.Barrier(n)

        def init() -> None:
            torch.get_num_threads()  # initialise this thread's setting first, then override it
            torch.set_num_threads(1)
            barrier.wait()

        pool = ThreadPoolExecutor(n, initializer=init, thread_name_prefix=_WORKER_NAME)
        for f in [pool.submit(lambda: None) for _ in range(n)]:
            f.result()
        torch.set_num_threads(caller)
        _POOL, _POOL_SIZE = pool, n
        return pool


def choose_workers(task_threads: int | str, task_map: str, fn: PureFn, *xs: torch.Tensor) -> int:
    """How many tasks the per-task loop runs at once (1: serial). 'auto' runs tasks
    concurrently only for an ``fn`` marked thread-safe (``module_fn``; the ``MAML``
    wrapper uses it): a plain ``functional_call`` closure over one module is not."""
    if task_threads != "auto":
        if isinstance(task_threads, bool) or not isinstance(task_threads, int) or task_threads < 1:
            raise ValueError(f"task_threads must be 'auto' or a positive int, got {task_threads!r}")
        if task_threads > 1 and task_map == "loop" and xs[0].device.type == "cuda":
            # a worker thread launches on its own current stream (the default one), unordered
            # with the caller's: results could be read before they are written
            raise ValueError(f"task_threads must be 1 (or 'auto') for CUDA tensors: worker threads would launch "
                             f"on their own streams, unordered with the caller's; got {task_threads}")
        return task_threads if task_map == "loop" else 1
    x = xs[0]
    if not getattr(fn, "thread_safe", False) or task_map != "loop" or x.device.type != "cpu" or x.shape[0] < 2:
        return 1
    if any(t[0].numel() > SMALL_TASK_INPUT for t in xs):
        return 1
    return max(1, min(torch.get_num_threads(), usable_cores(), x.shape[0]))


_USABLE_CORES: int | None = None  # measured at the first use of task_threads="auto"
_PROC_LOADAVG, _PROC_TASKS = "/proc/loadavg", "/proc/self/task"  # Linux's load figures


def usable_cores() -> int:
    """The cores the task workers of ``task_threads="auto"`` may use: this process's
    affinity mask (``os.sched_getaffinity``, not ``os.cpu_count``: a ``taskset`` or a
    cpuset leaves fewer) less the k cores other processes keep busy, at least 1; measured
    once, at the first use, and kept for the process.

    k is the smaller of two views of the other processes' load: the 1-minute load average
    (``os.getloadavg``), which only a steady load keeps up, and the number of runnable
    threads now outside this process (``/proc/loadavg``'s running count less this
    process's own running threads, the least of 5 samples 2 ms apart), which a load that
    has just started already shows but a short burst does not survive. Each alone misleads:
    the average still counts a job that ended a minute ago (or this process's own past
    work), one sample catches passing bursts. On a machine where the load figures cover
    more cores than the mask (a container on a larger host), k is scaled by mask/cpu_count.
    Where the running count cannot be read (no /proc), k = 0: the load average alone
    cannot tell others' load from this process's own."""
    global _USABLE_CORES
    if _USABLE_CORES is not None:
        return _USABLE_CORES
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    now: int | None = None
    try:
        for _ in range(5):
            with open(_PROC_LOADAVG) as f:
                running = int(f.read().split()[3].split("/")[0])
            own = 0
            for tid in os.listdir(_PROC_TASKS):
                try:
                    with open(os.path.join(_PROC_TASKS, tid, "stat")) as f:
                        own += f.read().rsplit(")", 1)[1].split()[0] == "R"
                except OSError:  # the thread ended meanwhile
                    pass
            now = max(0, running - own) if now is None else min(now, max(0, running - own))
            time.sleep(0.002)
        avg = os.getloadavg()[0]
    except (OSError, ValueError, IndexError, AttributeError):
        now, avg = None, 0.0
    busy = 0.0 if now is None else min(avg, float(now)) * cores / max(cores, os.cpu_count() or cores)
    _USABLE_CORES = max(1, cores - int(busy + 0.5))
    return _USABLE_CORES


def op_threads(task_threads: int | str, device: torch.device) -> int:
    """The intra-op threads for a meta-step's ops with ``task_threads="auto"`` on the CPU when
    other processes keep cores busy: :func:`usable_cores` where that is fewer than torch's
    thread count, else 0 (torch's setting). An OpenMP region that spans a core another
    process holds waits for that core's scheduler slices at every op: measured on 2 cores
    with one kept busy, an Omniglot meta-step took 51 s on 2 intra-op threads
    (benchmarks/RESULTS.md, "--load")."""
    if task_threads != "auto" or device.type != "cpu":
        return 0
    n = torch.get_num_threads()
    if n <= 1:
        return 0
    u = usable_cores()
    return u if u < n else 0


@contextlib.contextmanager
def confined(n: int):
    """Runs the block with ``n`` intra-op threads on this thread (``n`` from
    :func:`op_threads`; 0: unchanged), torch's setting restored after."""
    before = torch.get_num_threads() if n > 0 else 0
    if n <= 0 or n >= before or threading.current_thread().name.startswith(_WORKER_NAME):
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def module_fn(model: torch.nn.Module) -> PureFn:
    """``fn(params, x) = functional_call(model, params, x)``, safe to call from the task
    workers at the same time; for a plain ``nn.Sequential`` the same computation by direct
    per-layer calls (:func:`fastmaml.maml.sequential_fn.sequential_fn`). ``functional_call``
    swaps the parameters on the module object while it runs, so two threads must not share
    one module: a worker thread gets its own replica of the module's structure (made once
    per ``module_fn``), sharing the parameter and buffer tensors with ``model`` (nothing is
    copied, the replica sees the same buffers). The thread that called ``module_fn`` uses ``model`` itself; a module
    that cannot be deep-copied is shared, its calls made one at a time (correct, serial)."""
    if torch.compiler.is_compiling():
        # traced: one thread (no worker pool, which Dynamo cannot trace: thread ids, locks);
        # without ``thread_safe`` the task maps run the tasks serially
        return lambda params, x: torch.func.functional_call(model, params, (x,))
    direct = sequential_fn(model, channels_last_safe(model))  # a plain nn.Sequential: its layers called directly
    if direct is not None:
        return direct
    owner = threading.get_ident()
    replicas: dict[int, torch.nn.Module | None] = {}
    lock = threading.Lock()  # replica creation; and the calls on ``model`` if it cannot be copied

    def fn(params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        tid = threading.get_ident()
        if tid == owner:
            with lock:
                return torch.func.functional_call(model, params, (x,))
        if tid not in replicas:
            with lock:
                memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
                try:
                    replicas[tid] = copy.deepcopy(model, memo)
                except Exception:  # noqa: BLE001 - a module that cannot be copied: share it, one call at a time
                    replicas[tid] = None
        m = replicas[tid]
        if m is None:
            with lock:
                return torch.func.functional_call(model, params, (x,))
        return torch.func.functional_call(m, params, (x,))

    fn.thread_safe = True  # type: ignore[attr-defined]
    fn.channels_last_safe = channels_last_safe(model)  # type: ignore[attr-defined]
    return fn


# Layers whose forward runs correctly on channels_last tensors (PyTorch ops that keep or
# accept the layout; nothing that views the memory as NCHW): an exact type match, so a
# subclass with its own forward does not count.
_CHANNELS_LAST_LAYERS = (torch.nn.Sequential, torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.ReLU, torch.nn.ReLU6,
                         torch.nn.LeakyReLU, torch.nn.ELU, torch.nn.GELU, torch.nn.SiLU, torch.nn.Tanh,
                         torch.nn.Sigmoid, torch.nn.Softplus, torch.nn.MaxPool2d, torch.nn.AvgPool2d,
                         torch.nn.AdaptiveAvgPool2d, torch.nn.Flatten, torch.nn.Linear, torch.nn.Identity)


def channels_last_safe(model: torch.nn.Module) -> bool:
    """Whether ``model`` may run on channels_last images: it and all its submodules are
    of the plain layer types above (GroupNorm, for one, is not: PyTorch's CPU GroupNorm
    backward on channels_last tensors crashed in a test; a custom forward may .view())."""
    return all(type(m) in _CHANNELS_LAST_LAYERS for m in model.modules())


def run_tasks(f: Callable[[int], Any], T: int, workers: int) -> list[Any]:
    """[f(0), ..., f(T-1)], on ``workers`` threads when > 1 (the caller's grad mode is
    carried into the workers; exceptions propagate)."""
    if (workers <= 1 or T < 2 or torch._C._are_functorch_transforms_active() or torch.is_autocast_enabled()
            or threading.current_thread().name.startswith(_WORKER_NAME)):  # no nesting: serial inside a worker
        return [f(t) for t in range(T)]
    grad_on = torch.is_grad_enabled()

    def one(t: int) -> Any:
        with torch.set_grad_enabled(grad_on):
            return f(t)

    return list(task_pool(workers).map(one, range(T)))


def map_tasks(f: Callable[..., Any], in_dims: Sequence[int | None], task_map: str,
              workers: int = 1) -> Callable[..., Any]:
    """``f`` mapped over dim 0 of the arguments whose in_dim is 0 (others shared):
    ``vmap`` or a Python loop that stacks the per-task results (same semantics); the
    loop runs ``workers`` tasks at a time."""
    if task_map == "vmap":
        return torch.func.vmap(f, in_dims=tuple(in_dims))

    def looped(*args: Any) -> Any:
        T = next(pytree.tree_leaves(a)[0].shape[0] for a, d in zip(args, in_dims) if d is not None)

        def one(t: int) -> Any:
            return f(*[a if d is None else pytree.tree_map(lambda z: z[t], a) for a, d in zip(args, in_dims)])

        outs = run_tasks(one, T, workers)
        leaves0, spec = pytree.tree_flatten(outs[0])
        cols = [pytree.tree_leaves(o) for o in outs]
        return pytree.tree_unflatten([torch.stack([c[j] for c in cols]) for j in range(len(leaves0))], spec)

    return looped

