"""The functional MAML API: ``maml_loss`` (the meta-loss), ``adapt`` (per-task adapted
parameters) and ``predict`` (their predictions), for a pure function ``fn(params, x)``
or an ``nn.Module``. Every call asks the one router (:func:`fastmaml.maml.dispatch.route`)
which path runs it, as the ``MAML`` module does.

The meta-loss is once-differentiable on the fast paths: its backward is the adjoint
recursion (docs/DESIGN.md §1) run without a graph, so ``loss.backward()`` works but
differentiating the meta-gradient again raises a RuntimeError. Use
``backend="reference"`` for higher derivatives.

The fast paths differentiate the parameters and the learning rates. When the meta-loss
must also carry gradients to the inputs (``xs``... requiring grad: an encoder trained in
front of MAML) or to tensors ``fn`` closes over, the call runs on the reference path
instead (:func:`upstream_route`), which differentiates whatever the meta-loss depends
on: the reference's gradients, at the reference's memory (K steps of graph).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from fastmaml.reference import maml as ref
from fastmaml.maml import dispatch, mlp_path, modes
from fastmaml.maml.adjoint import MetaStep, inner_update, vmap_error
from fastmaml.maml.hvp import choose_hvp
from fastmaml.maml.plan import Plan
from fastmaml.maml.problem import PureFn, check_model, check_problem, resolve_msl
from fastmaml.maml.tasks import choose_workers, confined, map_tasks, op_threads

MAML_BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")
GRAPH_MEMORY_MB = dispatch.GRAPH_MEMORY_MB


def check_backend(backend: object) -> str:
    if not isinstance(backend, str) or backend not in MAML_BACKENDS:
        raise ValueError(f"backend must be one of {MAML_BACKENDS}, got {backend!r}")
    return backend


def lr_learned(lrs: object) -> bool:
    """Whether any learning-rate tensor requires grad."""
    if isinstance(lrs, torch.Tensor):
        return lrs.requires_grad
    if isinstance(lrs, Mapping):
        lrs = list(lrs.values())
    if isinstance(lrs, (list, tuple)):
        return any(isinstance(t, torch.Tensor) and t.requires_grad for t in lrs)
    return False


def n_msl(msl_weights: Sequence[float] | None) -> int:
    """How many query losses the meta-loss sums (non-zero MSL weights; 1 for plain MAML)."""
    return 1 if msl_weights is None else sum(1 for w in msl_weights if w != 0.0)


def as_fn(model: nn.Module) -> PureFn:
    def fn(p: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, dict(p), (x,))

    return fn


def maml_loss(
    fn: PureFn | nn.Module,
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
    backend: str = "auto",
    task_map: str = "auto",
    hvp: str = "auto",
    hvp_map: str = "auto",
    task_threads: int | str = "auto",
    graph_memory_mb: float = GRAPH_MEMORY_MB,
    fused_batch_norm: bool = True,
) -> torch.Tensor:
    """Meta-loss M = (1/T) Σ_t Σ_k w_k Lq(θ_{t,k}) of a pure function ``fn(params, x)``.

    ``fn`` may also be an ``nn.Module`` (called as ``functional_call(fn, params, (x,))``):
    then an ``nn.Sequential`` MLP of Linear and ReLU/Tanh takes the fused MLP op by
    itself (see :mod:`fastmaml.maml.mlp_path`), like ``fastmaml.MAML`` does.

    params: dict name -> tensor θ (float32/float64), shared by the tasks.
    lrs: float (fixed) | 0-d tensor (scalar, learned if it requires grad) |
        [n_adapted] | [K, n_adapted] (MAML++ LSLR) | list/dict of per-element tensors
        [*shape_i] or [K, *shape_i] (Meta-SGD), ordered like the adapted tensors.
    xs [T, Ns, ...], ys [T, Ns, ...] (float for 'mse', int64 for 'cross_entropy'),
    xq [T, Nq, ...], yq [T, Nq, ...].
    steps: K; first_order; loss: 'mse' | 'cross_entropy' | loss(pred, y); msl_weights:
    [K] or None; adapt: names adapted in the inner loop (None: all).
    backend: 'reference' (unrolled autograd, ground truth) or 'auto'/'cpu'/'cuda'/
    'triton' (fast paths; the name picks the ops' backend).
    The generic path's knobs (``MAML`` documents each): task_map, hvp, hvp_map,
    task_threads, graph_memory_mb, fused_batch_norm.
    Returns a 0-d tensor; once-differentiable on the fast paths.
    """
    modes.check_no_transform("fastmaml.maml_loss", backend)
    backend = check_backend(backend)
    module = fn if isinstance(fn, nn.Module) else None
    if module is not None:
        check_model(module)
    call = as_fn(module) if module is not None else fn
    if not isinstance(params, Mapping):
        check_problem(call, params, lrs, xs, ys, xq, yq, steps=steps, first_order=first_order, loss=loss,
                      msl_weights=msl_weights, adapt=adapt)  # raises: params must be a dict
    r = route_call(fn, params, lrs, (xs, ys, xq), steps=steps, loss=loss, msl_weights=msl_weights, adapt=adapt,
                   backend=backend, task_map=task_map, hvp=hvp)
    r = upstream_route(r, call, params, (xs, ys, xq, yq))
    if r.mlp is not None:
        st = r.mlp
        msl = mlp_path.msl_tensor(resolve_msl(msl_weights, steps) if msl_weights is not None else None,
                                  params[st.weight_names[0]])
        nthreads = 0 if torch.compiler.is_compiling() else op_threads(task_threads, xs.device)
        with confined(nthreads):  # the op's work is all in its forward
            return mlp_path.run(st, [params[n] for n in st.weight_names], [params[n] for n in st.bias_names], lrs,
                                xs, ys, xq, yq, steps=steps, first_order=first_order, loss=loss,  # type: ignore[arg-type]
                                msl_weights=msl, backend=backend)
    return run_generic(r, call, params, lrs, xs, ys, xq, yq, steps=steps, first_order=first_order, loss=loss,
                       msl_weights=msl_weights, adapt=adapt, backend=backend, hvp=hvp, hvp_map=hvp_map,
                       task_threads=task_threads, graph_memory_mb=graph_memory_mb, fused_batch_norm=fused_batch_norm)


# Not traced by torch.compile (docs/DESIGN.md §7): the generic meta-step is an autograd.Function
# whose forward runs the inner loop with torch.autograd.grad (and saves the RNG state for the
# backward's replay), neither of which Dynamo traces; left to it, the meta-step breaks at every
# inner gradient. Disabled here, a compiled caller has ONE graph break, at this call.
GENERIC_NOT_TRACED = ("fastmaml's generic meta-step runs eagerly: its inner loop differentiates with "
                      "torch.autograd.grad inside an autograd.Function, which Dynamo does not trace")


@torch.compiler.disable(reason=GENERIC_NOT_TRACED)
def run_generic(r: dispatch.Route, fn: PureFn, params: Mapping[str, torch.Tensor], lrs: object, xs: torch.Tensor,
                ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor, *, steps: int, first_order: bool, loss: object,
                msl_weights: object, adapt: Sequence[str] | None, backend: str, hvp: str, hvp_map: str,
                task_threads: int | str, graph_memory_mb: float, fused_batch_norm: bool,
                step_hook: Callable[[int, bool], None] | None = None) -> torch.Tensor:
    """The meta-loss on route ``r``'s reference or generic path (``fn`` a pure function;
    ``step_hook``: see :class:`fastmaml.maml.plan.Plan`)."""
    kw = dict(steps=steps, first_order=first_order, loss=loss, msl_weights=msl_weights, adapt=adapt)
    if r.path == "reference":
        return ref.maml_loss(fn, params, lrs, xs, ys, xq, yq, **kw)  # type: ignore[arg-type]
    prob = check_problem(fn, params, lrs, xs, ys, xq, yq, **kw)
    tm = r.task_map
    fused_bn = dispatch.choose_fused_bn(fused_batch_norm, tm, xs)
    if dispatch.choose_channels_last(fused_bn, tm, fn, xs):
        # every task's images as a channels_last tensor (one copy per meta-step); each layer
        # of a channels_last-safe model, the fused BatchNorm included, keeps the layout
        xs, xq = dispatch.tasks_channels_last(xs), dispatch.tasks_channels_last(xq)
    plan = Plan(fn=fn, prob=prob, task_map=tm, hvp=choose_hvp(hvp), sgd_backend=_sgd_backend(backend),
                grad_enabled=torch.is_grad_enabled(), hvp_map=dispatch.choose_hvp_map(hvp_map, tm, xs),
                workers=choose_workers(task_threads, tm, fn, xs, xq), op_threads=op_threads(task_threads, xs.device),
                graph_budget=dispatch.graph_budget(graph_memory_mb), fused_bn=fused_bn, step_hook=step_hook)
    flat = [params[n] for n in prob.adapted] + [params[n] for n in prob.fixed] + list(prob.lr.tensors)
    try:
        return MetaStep.apply(plan, *flat, xs, ys, xq, yq)
    except RuntimeError as e:
        err = vmap_error(e)
        if err is None:
            raise
        raise err from e


def upstream_route(r: dispatch.Route, fn: object, params: object, data: tuple | None) -> dispatch.Route:
    """``r``, or the reference path when the meta-step must also differentiate something
    outside ``params`` (see :func:`upstream_grads`): unrolled autograd differentiates
    whatever the meta-loss depends on. ``params``: the dict, or a function giving it."""
    if r.path == "reference" or data is None or not torch.is_grad_enabled():
        return r
    names = [nm for nm, t in zip(("xs", "ys", "xq", "yq"), data) if isinstance(t, torch.Tensor) and t.requires_grad]
    why = f"{', '.join(names)} require grad" if names else None
    if why is None and r.mlp is None:  # an nn.Sequential MLP closes over nothing
        why = upstream_grads(as_fn(fn) if isinstance(fn, nn.Module) else fn,
                             params() if callable(params) and not isinstance(params, Mapping) else params, data[0])
    if why is None:
        return r
    return dispatch.Route("reference", f"{why}: the reference backend (unrolled autograd) computes those gradients "
                          "too; the fast paths differentiate the parameters and rates only")


def upstream_grads(fn: object, params: object, xs: object) -> str | None:
    """Why ``fn`` needs gradients beyond ``params``: it depends on a tensor that requires
    grad and is not in ``params`` (a closed-over tensor, another module's parameter),
    found by one evaluation on the first two points of the first task's support set with
    detached parameters (whether the output requires grad does not depend on the number
    of points; the whole first task's set if the model refuses two points); else None.
    It runs on every call (a tensor's requires_grad may change between calls), so it is
    kept small: a full support forward of a conv net is ~5 % of a first-order meta-step."""
    if not (callable(fn) and isinstance(params, Mapping) and isinstance(xs, torch.Tensor) and xs.dim() >= 3
            and xs.shape[0] > 0 and all(isinstance(p, torch.Tensor) for p in params.values())):
        return None  # the checks report it
    detached = {n: p.detach() for n, p in params.items()}
    x0 = xs[0].detach()
    out = None
    for x in ((x0[:2], x0) if x0.shape[0] > 2 else (x0,)):
        try:
            out = fn(detached, x)
            break
        except Exception:  # noqa: BLE001 - the meta-step itself reports a failing fn
            continue
    if isinstance(out, torch.Tensor) and out.requires_grad:
        return "fn depends on a tensor outside params that requires grad (a closed-over tensor or module)"
    return None


def route_call(fn: object, params: Mapping[str, torch.Tensor], lrs: object, data: tuple | None, *, steps: object,
               loss: object, msl_weights: object, adapt: Sequence[str] | None, backend: str, task_map: str = "auto",
               hvp: str = "auto", key: tuple | None = None) -> dispatch.Route:
    """:func:`fastmaml.maml.dispatch.route` for a call's arguments (the lr and MSL in
    the form the router reads; ill-formed ones are left to the checks)."""
    valid_k = isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1
    msl = resolve_msl(msl_weights, steps) if (msl_weights is not None and valid_k) else None  # type: ignore[arg-type]
    adapted = list(params) if adapt is None else list(adapt) if isinstance(adapt, (list, tuple, set, frozenset)) else []
    return dispatch.route(fn, params, adapted, loss=loss, lr_learned=lr_learned(lrs) and torch.is_grad_enabled(),
                          n_msl=n_msl(msl), steps=steps, data=data, backend=backend, task_map=task_map, hvp=hvp,
                          key=key)


def _sgd_backend(backend: str | None) -> str | None:
    return None if backend in (None, "auto") else backend


def adapt(
    fn: PureFn | nn.Module,
    params: Mapping[str, torch.Tensor],
    lrs: object,
    xs: torch.Tensor,
    ys: torch.Tensor,
    *,
    steps: int,
    loss: object = "mse",
    adapt: Sequence[str] | None = None,
    backend: str = "auto",
    task_map: str = "auto",
    task_threads: int | str = "auto",
    fused_batch_norm: bool = True,
    step_hook: Callable[[int, bool], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Per-task adapted parameters θ_{t,steps} (no graph), dict name -> [T, *shape];
    tensors not adapted are expanded views of θ. ``step_hook(k, False)`` is called
    before step k's support gradients (per-step layers)."""
    module = fn if isinstance(fn, nn.Module) else None
    call = as_fn(module) if module is not None else fn
    if check_backend(backend) == "reference" and step_hook is None:
        return ref.adapt(call, params, lrs, xs, ys, steps=steps, loss=loss, adapt=adapt)  # type: ignore[arg-type]
    prob = check_problem(call, params, lrs, xs, ys, xs, ys, steps=steps, first_order=True, loss=loss,
                         msl_weights=None, adapt=adapt)
    tm = dispatch.choose_task_map(task_map, module, xs, xs.device)
    plan = Plan(fn=call, prob=prob, task_map=tm, sgd_backend=_sgd_backend(backend),
                workers=choose_workers(task_threads, tm, call, xs),
                fused_bn=dispatch.choose_fused_bn(fused_batch_norm, tm, xs))
    with torch.no_grad():
        pa = tuple(params[n].detach() for n in prob.adapted)
        phi = tuple(params[n].detach() for n in prob.fixed)
        lr_t = [t.detach() for t in prob.lr.tensors]
        try:
            for k in range(prob.steps):
                if step_hook is not None:
                    step_hook(k, False)
                g = plan.support_grads(pa, phi, xs, ys, shared=(k == 0))
                pa = inner_update(pa, g, prob.lr.sgd_lr(k, lr_t), plan.sgd_backend)
        except RuntimeError as e:
            err = vmap_error(e)
            if err is None:
                raise
            raise err from e
    out = dict(zip(prob.adapted, pa))
    out.update({n: p.expand(prob.T, *p.shape) for n, p in zip(prob.fixed, phi)})
    return {n: out[n] for n in prob.names}


def predict(fn: PureFn | nn.Module, fast: Mapping[str, torch.Tensor], xq: torch.Tensor, task_map: str = "auto",
            task_threads: int | str = "auto") -> torch.Tensor:
    """fn(fast_t, xq_t) for every task t: fast holds [T, *shape] tensors, xq [T, N, ...]."""
    module = fn if isinstance(fn, nn.Module) else None
    call = as_fn(module) if module is not None else fn
    tm = dispatch.choose_task_map(task_map, module, xq, xq.device)
    return map_tasks(lambda p, x: call(p, x), (0, 0), tm, choose_workers(task_threads, tm, call, xq))(dict(fast), xq)
