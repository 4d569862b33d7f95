"""The fast generic MAML path for any model that is a pure function of its parameters.

``fn(params, x)`` is evaluated per task by ``torch.func`` (``functional_call`` for
an ``nn.Module``); the meta-step is one custom ``torch.autograd.Function``:

* forward: the K inner steps of every task, with NO autograd graph. Per step, the
  per-task support gradients g_{t,k} come from the task map below and the update
  θ_{t,k+1} = θ_{t,k} − α_k ⊙ g_{t,k} is the fused multi-tensor ``ops.sgd_step``. The
  query losses (and their gradients, which the backward needs) are computed at the
  steps whose MSL weight w_k is non-zero. Kept for the backward: θ_{t,k} for
  k < K (second order) or g_{t,k} (first order with a learned lr), and ∇Lq(θ_{t,k}).
* backward: the adjoint recursion of DESIGN.md §1,

      v_K = (w_K/T) ∇Lq(θ_K)
      for k = K−1 … 0:
          dα_k += −g_k ⊙ v_{k+1}                 (reduced to α's granularity)
          v_k   = v_{k+1} − H_k (α_k ⊙ v_{k+1})   (second order; first: v_k = v_{k+1})
          v_k  += (w_k/T) ∇Lq(θ_k)               (k ≥ 1, MSL)
      dθ = Σ_t v_{t,0}

  where g_k and H_k u come together from one Hessian-vector product per task and
  step, recomputed from the stored θ_{t,k}. With ANIL (``adapt``) the gradient is
  taken w.r.t. all parameters and the tangent is zero on the fixed ones, so the same
  product yields the mixed term the fixed tensors φ get through the support loss:
  dφ = Σ_k (w_k/T) ∇_φLq(θ_k) − Σ_k H_{φθ,k}(α_k ⊙ v_{k+1}).

Memory: K+1 parameter copies per task (θ_k, plus ∇Lq at MSL steps) and one step's
activations — never K steps of activations and their double-backward graph. The price
is recomputing each step's support forward/backward once in the backward pass. Where the
support graphs are small (per-task loop; step 0's graph measured by saved-tensor hooks),
the graphs of the steps before the last are kept instead while K-1 of them fit
``graph_memory_mb`` (default 640 MiB, ``GRAPH_MEMORY_MB``): Omniglot T=32 keeps 41 MiB
per step; miniImageNet, one task at a time (below), 138 MiB per step, kept at K=5 and
recomputed from K=6 on, where its memory stays one step's activations.

One task at a time (``per_task``): when the per-task loop runs its tasks one after
another and its HVPs per task too (large inputs such as miniImageNet's), the forward
runs each task's inner loop, query loss *and adjoint* before the next task's, keeping
only that task's meta-gradient (computed for an incoming gradient of 1 — the
meta-gradient is linear in it — and scaled in the backward). Memory holds one task's
graphs and activations instead of all T tasks'; the meta-gradient is then computed in the
forward, so only when one is needed (grad mode on and some input requiring grad).
Measured (miniImageNet T=2, second order, 2-core CPU, each method in a fresh process, commit
afe52bd; benchmarks/RESULTS.md): 4.05 s per meta-step at K=5 against the loop peer's 5.74 s;
peak memory 534 MiB at K=1, 1.15 GiB at K=5 (its four support graphs kept), 764 MiB at K=10
and 730 MiB at K=20 (recomputed; the loop peer: 0.66, 1.23, 2.20, 3.69 GiB); with
``graph_memory_mb=0`` 563, 579 and 533 MiB at K=5, 10, 20.

BatchNorm in batch-statistics mode runs, in the CPU per-task loop, by
:func:`fastmaml.batch_norm.batch_norm` (``fused_batch_norm``, default True): fused C++
kernels for its forward, backward and a closed-form double backward (PyTorch's
``batchnorm_double_backward`` was 45 % of a miniImageNet task's HVP). It is routed by a
``TorchFunctionMode`` around each per-task call of ``fn``, so any model calling
``F.batch_norm`` (``nn.BatchNorm*d`` with ``track_running_stats=False``) gets it.

BatchNorm (pytorch/functorch#534): differentiating *through* a ``vmap(grad(...))``
(reverse mode applied outside a vmapped gradient, as an unrolled torch.func meta-loss
does) gives wrong second derivatives through ``batch_norm``. This path never does
that: every derivative level is taken either per task inside vmap, or by ordinary
autograd over the physical ops of a vmapped *forward* (no torch.func gradient level
exists to be differentiated through). The tests check all of them against a per-task
float64 loop on 4-conv BatchNorm networks and that a conv bias feeding BN gets a
meta-gradient of exactly 0.

How the per-task derivatives are taken (``hvp``; measured on the 2-core CPU, eager):
* ``"autograd"`` (default): plain autograd through a vmapped forward. Tasks are
  independent, so the gradient of Σ_t L_t w.r.t. per-task parameters [T, *shape] is
  the per-task gradient; the HVP is reverse-over-reverse (``create_graph`` then a
  second ``autograd.grad`` with grad_outputs u). Fastest measured here: the
  derivative passes run in autograd's C++ engine with no functorch levels.
* ``"rev_rev"``: ``vmap(vjp(grad(L)))``, torch.func, both levels inside vmap.
* ``"fwd_rev"``: ``vmap(jvp(grad(L)))``, forward-over-reverse (Pearlmutter). Exact
  and BN-safe too, but ~2× slower than the others in eager PyTorch on CPU (forward-
  mode AD of the backward ops goes through Python decompositions).

Mapping over tasks (``task_map``):
* ``"vmap"``: one batched call per step. Best for MLPs and other small dense models
  (per-task work is tiny, Python and dispatch overhead dominate).
* ``"loop"``: the same per-task computation in a Python loop, with plain autograd
  per task (reverse-over-reverse HVP, no torch.func at all unless hvp='rev_rev' or
  'fwd_rev' is asked for), results stacked. On CPU, vmap over convolutions (tasks
  folded into channel groups) measured ~1.3–1.7× slower than one ordinary
  convolution per task, so ``task_map="auto"`` picks the loop for image inputs
  ([T, N, C, H, W]) on CPU, vmap otherwise. Both give the same numbers. On CPU the loop
  runs its tasks concurrently, one per worker thread with one intra-op thread each
  (``task_threads``, ``run_tasks``), when ``fn`` is thread-safe (``module_fn``, which the
  ``MAML`` wrapper uses) and each task's inputs are small (≤ ``SMALL_TASK_INPUT``
  elements). Omniglot T=32 second order, 2-core CPU (the re-run in benchmarks/RESULTS.md,
  commit afe52bd): K=1 1.41 s against the loop peer's 1.63 s; K=5, with the kept graphs
  above, 3.03 s against 3.85 s. Before concurrency and kept graphs (one task at a time,
  only the last graph kept; an earlier run): 1.83 s vs 1.73 s and 3.94 s vs 3.83 s.

The backward's HVPs can be mapped differently from the rest (``hvp_map``: 'auto' |
'vmap' | 'loop'; 'vmap' with ``hvp='autograd'`` is the BatchNorm-safe autograd flavour
above). 'auto' keeps the task map, except for the per-task loop over images on CPU
with small support sets (at most ``SMALL_SUPPORT`` = 16 points per task), where the
HVPs are vmapped: each task's HVP on a 5-image support set is a few hundred tiny,
overhead-bound ops, and one batched HVP over the tasks runs them once. Measured
(2-core CPU shared with other jobs, float32, second order, one process, 3
interleaved rounds, medians of the whole meta-step; the bench's ``loop`` peer as
the yardstick): Omniglot T=32 K=5: loop peer 3.87 s, loop-mapped HVPs 4.49 s,
vmapped HVPs 3.44 s (an earlier run: 2.93 / 5.97 / 2.59 s). miniImageNet T=2 K=5
(25 images of 84×84 per task): loop peer 5.79 s, loop-mapped HVPs 5.55 s, vmapped
HVPs 9.00 s — grouped convolutions on large images lose, so larger support sets keep
the loop. Only the steps whose support graph was not kept (see Memory above: the last
step's always is, earlier ones within ``graph_memory_mb``) recompute an HVP, so the
choice matters only for those; at K=1, or with every graph kept, it does not matter.

The meta-loss is once-differentiable: its backward is the adjoint above, run without
a graph; a double backward through it raises a RuntimeError.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

from fastmaml import ops
from fastmaml._autograd import once_differentiable as _once_differentiable
from fastmaml.batch_norm import FusedBatchNorm
from fastmaml.batch_norm import available as fused_bn_available
from fastmaml._maml_common import MetaProblem, PureFn, check_problem

TASK_MAPS = ("auto", "vmap", "loop")

_DOUBLE_BACKWARD = (
    "fastmaml: the MAML meta-loss is once-differentiable: its backward is the adjoint recursion run "
    "without an autograd graph, so the meta-gradient cannot be differentiated again (double backward / "
    "create_graph=True). Use backend='reference' (unrolled autograd) if you need higher derivatives."
)


def once_differentiable(backward: Callable[..., tuple]) -> Callable[..., tuple]:
    """The meta-step's backward runs without a graph; a double backward raises (see
    :func:`fastmaml._autograd.once_differentiable`)."""
    return _once_differentiable(backward, _DOUBLE_BACKWARD)


def _choose_task_map(task_map: str, xs: torch.Tensor) -> str:
    if task_map not in TASK_MAPS:
        raise ValueError(f"task_map must be one of {TASK_MAPS}, got {task_map!r}")
    if task_map != "auto":
        return task_map
    # Images ([T, N, C, H, W]) on CPU: a per-task loop beats vmap's grouped convolutions.
    return "loop" if (xs.device.type == "cpu" and xs.dim() >= 5) else "vmap"


# Support sets of at most this many points per task count as "small" for the choice of
# the backward's HVP map (see the module docstring).
SMALL_SUPPORT = 16


def _choose_hvp_map(hvp_map: str, task_map: str, xs: torch.Tensor) -> str:
    """'' (= the task map) or the map of the backward's HVPs."""
    if hvp_map not in TASK_MAPS:
        raise ValueError(f"hvp_map must be one of {TASK_MAPS}, got {hvp_map!r}")
    if hvp_map != "auto":
        return hvp_map
    # A per-task loop over images with tiny support sets: each task's HVP is a handful
    # of small, overhead-bound ops; one vmapped HVP over all tasks is faster.
    if task_map == "loop" and xs.device.type == "cpu" and xs.dim() >= 5 and xs.shape[1] <= SMALL_SUPPORT:
        return "vmap"
    return ""


HVPS = ("auto", "autograd", "rev_rev", "fwd_rev")


def _choose_hvp(hvp: str) -> str:
    if hvp not in HVPS:
        raise ValueError(f"hvp must be one of {HVPS}, got {hvp!r}")
    return "autograd" if hvp == "auto" else hvp


# --- concurrent tasks on CPU ---------------------------------------------------------
# The per-task loop on CPU runs its tasks concurrently on a pool of worker threads, one
# intra-op thread each, instead of one task after another with every op split across the
# cores. A task's ops on a small image batch (Omniglot: 5 or 75 images of 28x28) are too
# small to split well: measured on the 2-core CPU, a 32-task query forward+backward took
# 1.03-1.36 s one task at a time on 2 intra-op threads, 1.8 s on one, and 0.88-1.0 s as
# two tasks at a time on one thread each. PyTorch's ops release the GIL, so the workers
# run in parallel; each task's numbers are computed exactly as in the serial loop, on one
# thread (so they do not depend on the number of workers).
_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0
_POOL_LOCK = threading.Lock()
_WORKER_NAME = "fastmaml-task"

# Per-task inputs up to this many elements count as small enough to run tasks
# concurrently (Omniglot's 75 x 1x28x28 query set: 58,800). Larger ones (miniImageNet:
# 75 x 3x84x84 = 1.6M) stay in the serial loop: their ops already use the cores (threads
# measured only 1.2x faster there) and concurrent tasks would hold several tasks'
# activations at once, breaking the one-step-of-activations memory bound.
SMALL_TASK_INPUT = 1 << 18


def _task_pool(n: int) -> ThreadPoolExecutor:
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


def _choose_workers(task_threads: int | str, task_map: str, fn: PureFn, *xs: torch.Tensor) -> int:
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
    return max(1, min(torch.get_num_threads(), x.shape[0]))


def module_fn(model: torch.nn.Module) -> PureFn:
    """``fn(params, x) = functional_call(model, params, x)``, safe to call from the task
    workers at the same time. ``functional_call`` swaps the parameters on the module
    object while it runs, so two threads must not share one module: a worker thread gets
    its own replica of the module's structure (made once per ``module_fn``), sharing the
    parameter and buffer tensors with ``model`` (nothing is copied, the replica sees the
    same buffers). The thread that called ``module_fn`` uses ``model`` itself; a module
    that cannot be deep-copied is shared, its calls made one at a time (correct, serial)."""
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
    return fn


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

    return list(_task_pool(workers).map(one, range(T)))


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


@dataclass
class _Plan:
    """Static (non-tensor) description of one meta-step, passed to the Function, and
    the three per-meta-batch primitives the forward and backward need, each mapped
    over tasks by vmap or by a loop (``task_map``):

    * ``support_grads``: g_t = ∇_θa Ls(θ_t) for every task;
    * ``query``: (∇Lq(θ_t), Lq(θ_t)) for every task (∇ over φ too when asked);
    * ``grad_hvp``: (g_t, H_t u_t) for every task, u on θa only.
    ``pa`` (adapted tensors) is either shared ([*shape], step 0) or per task."""

    fn: PureFn
    prob: MetaProblem
    task_map: str
    hvp: str  # 'autograd' | 'rev_rev' | 'fwd_rev'
    sgd_backend: str | None
    n_lr: int
    grad_enabled: bool = True  # the caller's grad mode when the meta-loss was built
    hvp_map: str = ""  # task map of the backward's HVPs only ('' = task_map)
    workers: int = 1  # tasks the per-task loop runs at once (see run_tasks)
    graph_budget: int = 0  # bytes of support graphs kept beyond the last step's (see _MetaStep)
    fused_bn: bool = False  # route the model's batch-statistics F.batch_norm to fastmaml.batch_norm
    per_task: bool = False  # one task at a time: forward and adjoint per task (see _MetaStep)

    # --- per-task pieces -----------------------------------------------------------
    def params(self, pa: Sequence[torch.Tensor], pf: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        d = dict(zip(self.prob.adapted, pa))
        d.update(zip(self.prob.fixed, pf))
        return d

    def loss(self, pa: tuple, pf: tuple, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fused = self.fused_bn and not torch._C._are_functorch_transforms_active()
        with FusedBatchNorm() if fused else contextlib.nullcontext():  # per call: modes are per thread
            return self.prob.loss_fn(self.fn(self.params(pa, pf), x), y)

    def _task_grad_hvp(self, with_fixed: bool) -> Callable[..., Any]:
        """(g, H u) of one task by torch.func, both derivative levels inside the task
        (so under vmap nothing differentiates through a vmapped gradient).

        'fwd_rev': jvp of grad (forward-over-reverse); 'rev_rev': vjp of grad. With
        ``with_fixed`` the gradient is w.r.t. (θa, φ) and the tangent lives on θa:
        ((g_a, g_f), (H_aa u, H_fa u)) — for rev_rev by the symmetry of the Hessian,
        ∂/∂(θa, φ) (∇_θa L · u) = H_{(θa,φ),θa} u."""
        argnums = (0, 1) if with_fixed else 0

        def fwd_rev(pa: tuple, pf: tuple, x: torch.Tensor, y: torch.Tensor, u: tuple) -> tuple:
            def g_of(a: tuple) -> Any:
                return torch.func.grad(self.loss, argnums=argnums)(a, pf, x, y)

            return torch.func.jvp(g_of, (pa,), (u,))

        def rev_rev(pa: tuple, pf: tuple, x: torch.Tensor, y: torch.Tensor, u: tuple) -> tuple:
            if with_fixed:
                def ga_of(a: tuple, f: tuple) -> Any:
                    g = torch.func.grad(self.loss, argnums=(0, 1))(a, f, x, y)
                    return g[0], g
                _, vjp_fn, g = torch.func.vjp(ga_of, pa, pf, has_aux=True)
                return g, vjp_fn(u)
            g, vjp_fn = torch.func.vjp(lambda a: torch.func.grad(self.loss)(a, pf, x, y), pa)
            return g, vjp_fn(u)[0]

        return fwd_rev if self.hvp == "fwd_rev" else rev_rev

    # --- the loop flavour: plain autograd per task (no torch.func, no vmap) -------------
    def _leaves(self, ts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [t.detach().requires_grad_(True) for t in ts]

    def _grads(self, out: torch.Tensor, wrt: Sequence[torch.Tensor], **kw: Any) -> list[torch.Tensor]:
        gs = torch.autograd.grad(out, wrt, allow_unused=True, **kw)
        return [torch.zeros_like(w) if g is None else g for g, w in zip(gs, wrt)]

    def _loop_task_grad(self, pa: tuple, pf: tuple, x: torch.Tensor, y: torch.Tensor, with_fixed: bool) -> tuple:
        with torch.enable_grad():
            a = self._leaves(pa)
            f = self._leaves(pf) if with_fixed else list(pf)
            val = self.loss(tuple(a), tuple(f), x, y)
            g = self._grads(val, a + (f if with_fixed else []))
        ga = tuple(g[:len(a)])
        return ((ga, tuple(g[len(a):])) if with_fixed else ga), val.detach()

    def _loop_task_grad_hvp(self, pa: tuple, pf: tuple, x: torch.Tensor, y: torch.Tensor, u: tuple,
                            with_fixed: bool) -> tuple:
        # Reverse-over-reverse per task, outside any vmap: exact, BatchNorm included.
        with torch.enable_grad():
            a = self._leaves(pa)
            f = self._leaves(pf) if with_fixed else list(pf)
            wrt = a + (f if with_fixed else [])
            val = self.loss(tuple(a), tuple(f), x, y)
            g = self._grads(val, a, create_graph=True)
            live = [(gi, ui) for gi, ui in zip(g, u) if gi.requires_grad]
            if live:
                hv = self._grads([gi for gi, _ in live], wrt, grad_outputs=[ui for _, ui in live])
            else:  # the gradient does not depend on the parameters (a linear loss)
                hv = [torch.zeros_like(w) for w in wrt]
        g = [gi.detach() for gi in g]
        if with_fixed:
            return (tuple(g), None), (tuple(hv[:len(a)]), tuple(hv[len(a):]))
        return tuple(g), tuple(hv)

    # --- the 'autograd' flavour: plain autograd through a vmapped forward ---------------
    # vmap only batches the forward over tasks; both derivative levels are ordinary
    # autograd over the physical (batched) ops, so no torch.func grad level exists that
    # anything could differentiate through. Tasks are independent, so the gradient of
    # Σ_t L_t w.r.t. the per-task parameters [T, *shape] is the per-task gradient, and
    # w.r.t. the shared φ it is the sum over tasks.
    def _ag_leaves(self, pa: tuple, T: int, shared: bool) -> list[torch.Tensor]:
        return [(p.detach().unsqueeze(0).expand(T, *p.shape) if shared else p.detach()).requires_grad_(True)
                for p in pa]

    def _ag_loss(self, a: Sequence[torch.Tensor], f: Sequence[torch.Tensor], x: torch.Tensor,
                 y: torch.Tensor) -> torch.Tensor:
        return torch.func.vmap(self.loss, in_dims=(0, None, 0, 0))(tuple(a), tuple(f), x, y)

    def _ag_grad(self, pa: tuple, pf: tuple, x: torch.Tensor, y: torch.Tensor, shared: bool,
                 with_fixed: bool) -> tuple:
        with torch.enable_grad():
            a = self._ag_leaves(pa, x.shape[0], shared)
            f = self._leaves(pf) if with_fixed else list(pf)
            vals = self._ag_loss(a, f, x, y)
            g = self._grads(vals.sum(), a + (f if with_fixed else []))
        ga = tuple(g[:len(a)])
        if with_fixed:
            return (ga, tuple(gi.unsqueeze(0) for gi in g[len(a):])), vals.detach()
        return ga, vals.detach()

    def _ag_grad_hvp(self, pa: tuple, pf: tuple, x: torch.Tensor, y: torch.Tensor, u: tuple, shared: bool,
                     with_fixed: bool) -> tuple:
        with torch.enable_grad():
            a = self._ag_leaves(pa, x.shape[0], shared)
            f = self._leaves(pf) if with_fixed else list(pf)
            wrt = a + (f if with_fixed else [])
            g = self._grads(self._ag_loss(a, f, x, y).sum(), a, create_graph=True)
            live = [(gi, ui) for gi, ui in zip(g, u) if gi.requires_grad]
            if live:
                hv = self._grads([gi for gi, _ in live], wrt, grad_outputs=[ui for _, ui in live])
            else:
                hv = [torch.zeros_like(w) for w in wrt]
        g = tuple(gi.detach() for gi in g)
        if with_fixed:
            return g, tuple(hv[:len(a)]), tuple(h.unsqueeze(0) for h in hv[len(a):])
        return g, tuple(hv), None

    # --- the last inner step, with its graph kept for the backward -----------------------
    def support_grads_kept(self, pa: tuple, pf: tuple, xs: torch.Tensor, ys: torch.Tensor, shared: bool,
                           with_fixed: bool, measure: bool = False
                           ) -> tuple[tuple, Callable[[tuple], tuple], int | None]:
        """(g, hvp, bytes) at one inner step: the support gradient is taken with
        create_graph=True and its graph kept, so the backward's HVP at this step,
        hvp(u) -> (H_aa u, H_fa u or None), needs no recomputation of the support
        forward/backward. Always used at the LAST step (one step's activations, which the
        memory bound allows; at K = 1 it is the whole recomputation), and at the earlier
        steps while the kept graphs fit ``graph_budget`` (see ``_MetaStep``). With
        ``measure`` (per-task loop only) ``bytes`` is the size of the tensors the graph
        saves beyond its inputs, counted by saved-tensor hooks; else None. Only for the
        'autograd' derivative method (vmap) and the loop."""
        T = xs.shape[0]
        sizes = [0] * T
        with torch.enable_grad():
            if self.task_map == "vmap":
                a = self._ag_leaves(pa, T, shared)
                f = self._leaves(pf) if with_fixed else list(pf)
                graphs = [(a, f, self._grads(self._ag_loss(a, f, xs, ys).sum(), a, create_graph=True))]
            else:
                def build(t: int) -> tuple:
                    a = self._leaves(pa if shared else tuple(p[t] for p in pa))
                    f = self._leaves(pf) if with_fixed else list(pf)
                    return a, f, self._grads(self.loss(tuple(a), tuple(f), xs[t], ys[t]), a, create_graph=True)

                def one(t: int) -> tuple:  # run_tasks carries the enabled grad mode into workers
                    if not measure:
                        return build(t)
                    seen = {x.untyped_storage().data_ptr() for x in (*pa, *pf, xs, ys)}

                    def pack(x: torch.Tensor) -> torch.Tensor:
                        st = x.untyped_storage()
                        if st.data_ptr() not in seen:
                            seen.add(st.data_ptr())
                            sizes[t] += st.nbytes()
                        return x

                    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
                        return build(t)

                graphs = run_tasks(one, T, self.workers)
        if self.task_map == "vmap":
            g = tuple(gi.detach() for gi in graphs[0][2])
        else:
            g = tuple(torch.stack([gr[2][i].detach() for gr in graphs]) for i in range(len(pa)))

        def hvp(u: tuple) -> tuple:
            def one(t: int) -> list[torch.Tensor]:
                a, f, gk = graphs[t]
                graphs[t] = None  # the graph is used once; free it as soon as it is
                ut = u if self.task_map == "vmap" else tuple(ui[t] for ui in u)
                wrt = a + (f if with_fixed else [])
                live = [(gi, ui) for gi, ui in zip(gk, ut) if gi.requires_grad]
                if live:
                    return self._grads([gi for gi, _ in live], wrt, grad_outputs=[ui for _, ui in live])
                return [torch.zeros_like(w) for w in wrt]

            outs = run_tasks(one, len(graphs), 1 if self.task_map == "vmap" else self.workers)
            graphs.clear()
            na = len(pa)
            if self.task_map == "vmap":
                hv = outs[0]
                hv_f = tuple(h.unsqueeze(0) for h in hv[na:]) if with_fixed else None
                return tuple(hv[:na]), hv_f
            hv_a = tuple(torch.stack([o[i] for o in outs]) for i in range(na))
            hv_f = tuple(torch.stack([o[na + i] for o in outs]) for i in range(len(pf))) if with_fixed else None
            return hv_a, hv_f

        return g, hvp, (sum(sizes) if measure and self.task_map != "vmap" else None)

    # --- mapped over the meta-batch -----------------------------------------------------
    def support_grads(self, pa: tuple, pf: tuple, xs: torch.Tensor, ys: torch.Tensor, shared: bool) -> tuple:
        d = None if shared else 0
        if self.task_map == "vmap" and self.hvp == "autograd":
            return self._ag_grad(pa, pf, xs, ys, shared, False)[0]
        if self.task_map == "vmap":
            return torch.func.vmap(torch.func.grad(self.loss), in_dims=(d, None, 0, 0))(pa, pf, xs, ys)
        f = lambda a, pf_, x, y: self._loop_task_grad(a, pf_, x, y, False)[0]  # noqa: E731
        return map_tasks(f, (d, None, 0, 0), "loop", self.workers)(pa, pf, xs, ys)

    def query(self, pa: tuple, pf: tuple, xq: torch.Tensor, yq: torch.Tensor, need_grad: bool,
              with_fixed: bool) -> Any:
        """need_grad: (grads, values [T]); else values [T]."""
        if self.task_map == "vmap" and self.hvp == "autograd" and need_grad:
            return self._ag_grad(pa, pf, xq, yq, False, with_fixed)
        if self.task_map == "vmap":
            if not need_grad:
                return torch.func.vmap(self.loss, in_dims=(0, None, 0, 0))(pa, pf, xq, yq)
            f = torch.func.grad_and_value(self.loss, argnums=(0, 1) if with_fixed else 0)
            return torch.func.vmap(f, in_dims=(0, None, 0, 0))(pa, pf, xq, yq)
        if not need_grad:
            return map_tasks(self.loss, (0, None, 0, 0), "loop", self.workers)(pa, pf, xq, yq)
        f = lambda a, pf_, x, y: self._loop_task_grad(a, pf_, x, y, with_fixed)  # noqa: E731
        return map_tasks(f, (0, None, 0, 0), "loop", self.workers)(pa, pf, xq, yq)

    def grad_hvp(self, pa: tuple, pf: tuple, xs: torch.Tensor, ys: torch.Tensor, u: tuple, shared: bool,
                 with_fixed: bool) -> tuple:
        """(g_a, H_aa u, H_fa u or None), per task."""
        d = None if shared else 0
        tm = self.hvp_map or self.task_map
        if tm == "vmap" and self.hvp == "autograd":
            return self._ag_grad_hvp(pa, pf, xs, ys, u, shared, with_fixed)
        if tm == "vmap":
            g, hv = torch.func.vmap(self._task_grad_hvp(with_fixed), in_dims=(d, None, 0, 0, 0))(pa, pf, xs, ys, u)
            if with_fixed:
                return g[0], hv[0], hv[1]
            return g, hv, None
        if self.hvp in ("fwd_rev", "rev_rev"):  # torch.func per task, in a Python loop
            per_task = map_tasks(self._task_grad_hvp(with_fixed), (d, None, 0, 0, 0), "loop", self.workers)
            g, hv = per_task(pa, pf, xs, ys, u)
            if with_fixed:
                return g[0], hv[0], hv[1]
            return g, hv, None
        f = lambda a, pf_, x, y, u_: self._loop_task_grad_hvp(a, pf_, x, y, u_, with_fixed)  # noqa: E731
        if with_fixed:
            f2 = lambda *args: (lambda r: (r[0][0], r[1][0], r[1][1]))(f(*args))  # noqa: E731
            return map_tasks(f2, (d, None, 0, 0, 0), "loop", self.workers)(pa, pf, xs, ys, u)
        f1 = lambda *args: (lambda r: (r[0], r[1]))(f(*args))  # noqa: E731
        g, hv = map_tasks(f1, (d, None, 0, 0, 0), "loop", self.workers)(pa, pf, xs, ys, u)
        return g, hv, None


@dataclass
class _Pass:
    """What one forward pass over a chunk of tasks keeps for its adjoint: the inputs it
    recomputes from, θ_k (second order), g_k (first order with a learned lr),
    ∇Lq(θ_k) at the MSL steps, the kept support graphs and the query gradients of φ."""

    phi: tuple
    lr_t: list
    xs: torch.Tensor
    ys: torch.Tensor
    states: list
    gs: list
    gq_a: list
    gq_f: list
    kept: list


def _forward_pass(plan: _Plan, theta_a: tuple, phi: tuple, lr_t: list, xs: torch.Tensor, ys: torch.Tensor,
                  xq: torch.Tensor, yq: torch.Tensor, flags: tuple[bool, bool, bool]) -> tuple[torch.Tensor, _Pass]:
    """The K inner steps and the query losses of the tasks in xs (no graph). Returns
    Σ_k w_k mean_t Lq_t(θ_{t,k}) over these tasks and what their adjoint needs."""
    prob = plan.prob
    need_a, need_f, need_lr = flags
    need_any = need_a or need_f or need_lr
    second = not prob.first_order
    keep_states = need_any and second
    keep_g = need_lr and not second

    pa: tuple = theta_a
    states: list[tuple] = [theta_a]  # θ_0 is shared by the tasks (not expanded)
    gs: list[tuple] = []
    gq_a: list[tuple | None] = [None] * (prob.steps + 1)
    gq_f = [torch.zeros_like(p) for p in phi] if need_f else []
    total = torch.zeros((), dtype=xs.dtype, device=xs.device)
    # Keep the last step's support graph for the backward (saves its recomputation),
    # and the earlier steps' too while they fit the budget: step 0's graph is measured
    # (per-task loop) and kept only if K-1 graphs of its size fit plan.graph_budget.
    keep_last = keep_states and (plan.task_map == "loop" or plan.hvp == "autograd")
    keep_more = keep_last and plan.task_map == "loop" and plan.graph_budget > 0 and prob.steps > 1
    kept: list = [None] * prob.steps  # (g_k, hvp_k) of the steps whose graph is kept
    for k in range(prob.steps):
        if keep_last and (k == prob.steps - 1 or keep_more):
            g, hvp_k, size = plan.support_grads_kept(pa, phi, xs, ys, k == 0, need_f, measure=(k == 0))
            kept[k] = (g, hvp_k)
            if k == 0 and k != prob.steps - 1 and (size is None or size * (prob.steps - 1) > plan.graph_budget):
                keep_more = False
                kept[0] = None  # over budget: recompute this step in the backward instead
        else:
            g = plan.support_grads(pa, phi, xs, ys, shared=(k == 0))
        if keep_g:
            gs.append(g)
        pa = _inner_update(pa, g, prob.lr.sgd_lr(k, lr_t), plan.sgd_backend)
        del g
        if keep_states and k + 1 < prob.steps:
            states.append(pa)
        w = prob.msl[k]
        if w == 0.0:
            continue
        if need_any:
            grads, val = plan.query(pa, phi, xq, yq, True, need_f)
            if need_f:
                ga, gf = grads
                for acc, gfi in zip(gq_f, gf):
                    acc.add_(gfi.sum(0), alpha=w)
            else:
                ga = grads
            gq_a[k + 1] = ga
            del grads, ga
        else:
            val = plan.query(pa, phi, xq, yq, False, False)
        total = total + w * val.mean()
    return total, _Pass(phi, lr_t, xs, ys, states, gs, gq_a, gq_f, kept)


def _adjoint(plan: _Plan, st: _Pass, scale: torch.Tensor | float, flags: tuple[bool, bool, bool]) -> tuple:
    """The adjoint recursion over the tasks of one forward pass: (dθa, dφ, dlr), each a
    list (None entries where not needed); ``scale`` = the incoming gradient / T. Frees
    the pass's θ_k and kept graphs as it goes."""
    prob = plan.prob
    need_a, need_f, need_lr = flags
    phi, lr_t, xs, ys = st.phi, st.lr_t, st.xs, st.ys
    K = prob.steps
    second = not prob.first_order

    # v_K = (w_K/T) ∇Lq(θ_K), per task [T, *shape_i]
    if prob.msl[K - 1] != 0.0:
        v = [scale * prob.msl[K - 1] * gi for gi in st.gq_a[K]]
    else:
        v = [torch.zeros((xs.shape[0], *p.shape), dtype=xs.dtype, device=xs.device) for p in st.states[0]]
    dlr = [torch.zeros_like(t) for t in lr_t] if need_lr else []
    dphi = [scale * w for w in st.gq_f] if need_f else []
    for k in reversed(range(K)):
        if second:
            u = tuple(prob.lr.rate(k, i, lr_t) * vi for i, vi in enumerate(v))  # α_k ⊙ v_{k+1}
            if st.kept[k] is not None:
                g_a, (hv_a, hv_f) = st.kept[k][0], st.kept[k][1](u)
                st.kept[k] = None  # used once
            else:
                g_a, hv_a, hv_f = plan.grad_hvp(st.states[k], phi, xs, ys, u, k == 0, need_f)
            st.states[k] = None  # used once
            if need_f:
                for acc, h in zip(dphi, hv_f):
                    acc.sub_(h.sum(0))  # dφ −= H_{φθ}(α_k ⊙ v_{k+1})
        else:
            g_a = st.gs[k] if need_lr else None
        if need_lr:
            for i, (gi, vi) in enumerate(zip(g_a, v)):
                prob.lr.reduce_grad(k, i, -(gi * vi), dlr)  # dα_k += −g_k ⊙ v_{k+1}
        # In place (v is a fresh tensor made at the start of the backward).
        if second:
            for vi, hi in zip(v, hv_a):
                vi.sub_(hi)  # v_k = v_{k+1} − H_k(α_k ⊙ v_{k+1})
            del u, hv_a, hv_f
        if k >= 1 and prob.msl[k - 1] != 0.0:
            for vi, gi in zip(v, st.gq_a[k]):
                vi.add_(scale * prob.msl[k - 1] * gi)
    dtheta = [vi.sum(0) for vi in v] if need_a else [None] * len(v)
    if not need_f:
        dphi = [None] * len(phi)
    if not need_lr:
        dlr = [None] * len(lr_t)
    return dtheta, dphi, dlr


def _add(acc: list | None, new: list) -> list:
    return new if acc is None else [a if b is None else a + b for a, b in zip(acc, new)]


class _MetaStep(torch.autograd.Function):
    """forward(plan, *θa, *φ, *lr_tensors, xs, ys, xq, yq) -> M (0-d).

    Classic ``forward(ctx, ...)`` style rather than ``setup_context``: the forward's
    products the backward needs (θ_k, g_k, ∇Lq(θ_k)) are intermediates, not outputs.

    One task at a time (``plan.per_task``: the serial per-task loop whose HVPs are
    per task too): the forward runs each task's inner loop, query and adjoint before the
    next task's, keeping that task's meta-gradient (for an incoming gradient of 1; the
    meta-gradient is linear in it) and freeing its θ_k and support graphs. Memory then
    holds one task's graphs and activations instead of all T tasks' (the per-task loop
    peer's profile), at the price of computing the meta-gradient in the forward (so only
    when a meta-gradient is needed).
    """

    @staticmethod
    def forward(ctx: Any, plan: _Plan, *flat: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        prob = plan.prob
        na, nf = len(prob.adapted), len(prob.fixed)
        theta_a = tuple(flat[:na])
        phi = tuple(flat[na:na + nf])
        lr_t = list(flat[na + nf:na + nf + plan.n_lr])
        xs, ys, xq, yq = flat[na + nf + plan.n_lr:]
        # Under torch.no_grad() (evaluation) needs_input_grad still says True: the
        # plan records the caller's grad mode so no meta-gradient work is done then.
        grad_on = plan.grad_enabled
        need_a = grad_on and any(ctx.needs_input_grad[1:1 + na])
        need_f = grad_on and any(ctx.needs_input_grad[1 + na:1 + na + nf])
        need_lr = grad_on and any(ctx.needs_input_grad[1 + na + nf:1 + na + nf + plan.n_lr])
        flags = (need_a, need_f, need_lr)
        need_any = need_a or need_f or need_lr
        T = prob.T
        ctx.pre = None
        if need_any and plan.per_task and T > 1:
            total = torch.zeros((), dtype=xs.dtype, device=xs.device)
            grads = None
            for t in range(T):
                s = slice(t, t + 1)
                tot_t, st = _forward_pass(plan, theta_a, phi, lr_t, xs[s], ys[s], xq[s], yq[s], flags)
                total = total + tot_t / T
                dt, df, dl = _adjoint(plan, st, 1.0 / T, flags)
                del st
                grads = _add(grads, [*dt, *df, *dl])
            ctx.pre = grads
        else:
            total, st = _forward_pass(plan, theta_a, phi, lr_t, xs, ys, xq, yq, flags)
            if need_any:
                ctx.st = st
        if need_any:
            ctx.plan = plan
            ctx.flags = flags
            ctx.save_for_backward(*flat)  # version counters catch in-place edits of the inputs
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:  # type: ignore[override]
        plan: _Plan = ctx.plan
        ctx.saved_tensors  # noqa: B018 - raises if an input was modified in place since the forward
        if ctx.pre is not None:
            grads = [None if g is None else g * grad_out for g in ctx.pre]
            ctx.pre = None
        else:
            dt, df, dl = _adjoint(plan, ctx.st, grad_out / plan.prob.T, ctx.flags)
            ctx.st = None
            grads = [*dt, *df, *dl]
        return (None, *grads, None, None, None, None)


# Default memory for keeping the support graphs of the inner steps before the last one
# (per-task loop): a kept graph saves recomputing that step's support forward and
# backward in the meta-backward. It bounds the graphs held at one time: those of all T
# tasks when tasks run concurrently (Omniglot, 5 support images per task, T=32: 41 MiB
# per step, 166 MiB at K=5, kept), one task's when they run one at a time (miniImageNet,
# 25 images of 84x84: 138 MiB per step, 551 MiB at K=5, kept; 1.24 GB at K=10, so K >= 6
# recomputes and its memory stays one step's activations).
GRAPH_MEMORY_MB = 640.0


def _choose_fused_bn(fused: bool, task_map: str, xs: torch.Tensor) -> bool:
    """The fused BatchNorm applies to the per-task loop (vmap has no rule for it) on
    CPU with the extension built."""
    if not isinstance(fused, bool):
        raise TypeError(f"fused_batch_norm must be a bool, got {type(fused).__name__}")
    return fused and task_map == "loop" and xs.device.type == "cpu" and fused_bn_available()


def _graph_budget(mb: float) -> int:
    if isinstance(mb, bool) or not isinstance(mb, (int, float)) or not mb >= 0 or mb == float("inf"):
        raise ValueError(f"graph_memory_mb must be a finite number >= 0, got {mb!r}")
    return int(mb * 2**20)


def maml_loss(
    fn: PureFn,
    params: Mapping[str, torch.Tensor],
    lrs: object,
    xs: torch.Tensor,
    ys: torch.Tensor,
    xq: torch.Tensor,
    yq: torch.Tensor,
    *,
    steps: int,
    first_order: bool = False,
    loss: object = "mse",
    msl_weights: object = None,
    adapt: Sequence[str] | None = None,
    backend: str | None = None,
    task_map: str = "auto",
    hvp: str = "auto",
    hvp_map: str = "auto",
    task_threads: int | str = "auto",
    graph_memory_mb: float = GRAPH_MEMORY_MB,
    fused_batch_norm: bool = True,
) -> torch.Tensor:
    """The meta-loss M by the generic fast path; arguments as
    :func:`fastmaml.reference.maml_loss`. ``backend`` selects ``ops.sgd_step``'s
    backend (None/'auto': automatic). ``task_map``: 'auto' | 'vmap' | 'loop';
    ``hvp``: 'auto' (= 'autograd') | 'autograd' | 'rev_rev' | 'fwd_rev';
    ``hvp_map``: 'auto' | 'vmap' | 'loop', the task map of the backward's HVPs only
    (see the module docstring); ``task_threads``: 'auto' or how many tasks the per-task
    loop runs at once on worker threads (``run_tasks``; 'auto': on CPU with small per-task
    inputs and an ``fn`` made by :func:`module_fn`, as many as torch's intra-op threads,
    else 1; an int > 1 declares ``fn`` safe to call from several threads at once);
    ``graph_memory_mb``: how much memory the support graphs of the steps before the last
    may keep for the backward (per-task loop; 0: recompute them, the minimum-memory
    mode); ``fused_batch_norm``: in the per-task loop on CPU, run the model's
    batch-statistics ``F.batch_norm`` calls by :func:`fastmaml.batch_norm.batch_norm` (the
    fused kernels with the closed-form double backward; False: PyTorch's). Returns a 0-d
    tensor whose backward is the adjoint; it is once-differentiable (a double backward
    raises RuntimeError)."""
    prob = check_problem(fn, params, lrs, xs, ys, xq, yq, steps=steps, first_order=first_order, loss=loss,
                         msl_weights=msl_weights, adapt=adapt)
    tm = _choose_task_map(task_map, xs)
    plan = _Plan(fn, prob, tm, _choose_hvp(hvp), None if backend in (None, "auto") else backend,
                 len(prob.lr.tensors), torch.is_grad_enabled(), _choose_hvp_map(hvp_map, tm, xs),
                 _choose_workers(task_threads, tm, fn, xs, xq), _graph_budget(graph_memory_mb),
                 _choose_fused_bn(fused_batch_norm, tm, xs))
    # One task at a time where the tasks already run one after another, HVPs included.
    plan.per_task = tm == "loop" and plan.workers == 1 and (plan.hvp_map or tm) == "loop"
    flat = [params[n] for n in prob.adapted] + [params[n] for n in prob.fixed] + list(prob.lr.tensors)
    return _MetaStep.apply(plan, *flat, xs, ys, xq, yq)


def adapt(
    fn: PureFn,
    params: Mapping[str, torch.Tensor],
    lrs: object,
    xs: torch.Tensor,
    ys: torch.Tensor,
    *,
    steps: int,
    loss: object = "mse",
    adapt: Sequence[str] | None = None,
    backend: str | None = None,
    task_map: str = "auto",
    task_threads: int | str = "auto",
    fused_batch_norm: bool = True,
) -> dict[str, torch.Tensor]:
    """Per-task adapted parameters θ_{t,steps} (no graph), dict name -> [T, *shape];
    tensors not adapted are expanded views of θ."""
    prob = check_problem(fn, params, lrs, xs, ys, xs, ys, steps=steps, first_order=True, loss=loss,
                         msl_weights=None, adapt=adapt)
    tm = _choose_task_map(task_map, xs)
    plan = _Plan(fn, prob, tm, "autograd", None if backend in (None, "auto") else backend, len(prob.lr.tensors),
                 workers=_choose_workers(task_threads, tm, fn, xs),
                 fused_bn=_choose_fused_bn(fused_batch_norm, tm, xs))
    T = prob.T
    with torch.no_grad():
        pa = tuple(params[n].detach() for n in prob.adapted)
        phi = tuple(params[n].detach() for n in prob.fixed)
        lr_t = [t.detach() for t in prob.lr.tensors]
        for k in range(prob.steps):
            g = plan.support_grads(pa, phi, xs, ys, shared=(k == 0))
            pa = _inner_update(pa, g, prob.lr.sgd_lr(k, lr_t), plan.sgd_backend)
    out = dict(zip(prob.adapted, pa))
    out.update({n: p.expand(T, *p.shape) for n, p in zip(prob.fixed, phi)})
    return {n: out[n] for n in prob.names}


def _inner_update(pa: tuple, g: tuple, lr: object, backend: str | None) -> tuple:
    """θ_{k+1} = θ_k − α_k ⊙ g_k by the fused ``ops.sgd_step``. Gradients that come out of
    vmap/autograd may be non-contiguous views (e.g. of a transposed weight); the kernels
    take contiguous tensors, so those are compacted first (a no-op otherwise)."""
    return tuple(ops.sgd_step([p.contiguous() for p in pa], [x.contiguous() for x in g], lr, backend=backend))


def predict(fn: PureFn, fast: Mapping[str, torch.Tensor], xq: torch.Tensor, task_map: str = "auto",
            task_threads: int | str = "auto") -> torch.Tensor:
    """fn(fast_t, xq_t) for every task t: fast holds [T, *shape] tensors, xq [T, N, ...]."""
    tm = _choose_task_map(task_map, xq)
    return map_tasks(lambda p, x: fn(p, x), (0, 0), tm, _choose_workers(task_threads, tm, fn, xq))(dict(fast), xq)
