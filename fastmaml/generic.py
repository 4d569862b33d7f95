"""The fast generic MAML path for any model that is a pure function of its parameters.

``fn(params, x)`` is evaluated per task by ``torch.func`` (``functional_call`` for
an ``nn.Module``); the meta-step is one custom ``torch.autograd.Function``:

* forward: the K inner steps of every task, with NO autograd graph. Per step, the
  per-task support gradients g_{t,k} come from ``vmap(grad(Ls))`` and the update
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

  where H_k(u) and g_k come together from ONE forward-over-reverse product,
  ``jvp(grad(Ls), (θ_k,), (u,))``, mapped over tasks. With ANIL (``adapt``) the
  gradient is taken with respect to all parameters and the tangent is zero on the
  fixed ones, so the same product also yields the mixed term H_{φθ}(α ⊙ v) that the
  fixed tensors φ receive through the support loss: dφ = Σ_k (w_k/T) ∇_φLq(θ_k)
  − Σ_k H_{φθ,k}(α_k ⊙ v_{k+1}).

Why this shape: nothing ever differentiates THROUGH a vmapped gradient (reverse over
a ``vmap(grad)``), which torch.func gets wrong for ``batch_norm``
(pytorch/functorch#534); forward-over-reverse through batch-statistics BatchNorm is
correct. And memory is K+1 parameter copies per task plus one step's activations,
not K steps of activations and their double-backward graph.

Mapping over tasks ("task_map"):
* ``"vmap"``: ``torch.func.vmap`` over the task dimension — one batched call per
  step. Best for MLPs and other small dense models (per-task work is tiny, Python
  and dispatch overhead dominate).
* ``"loop"``: the same per-task function called once per task and the results
  stacked. On CPU, torch.func's batching rule for convolution (tasks folded into
  channel groups) is slower than one ordinary convolution per task, so image models
  on CPU take the loop. Both give the same numbers; ``task_map="auto"`` picks loop
  for inputs with ≥ 3 dims per point (images: [T, N, C, H, W]) on CPU, vmap otherwise.

The meta-loss is once-differentiable: its backward is the adjoint above, run without
a graph; a double backward through it raises a RuntimeError.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.function import once_differentiable
from torch.utils import _pytree as pytree

from fastmaml import ops
from fastmaml._maml_common import MetaProblem, PureFn, check_problem

TASK_MAPS = ("auto", "vmap", "loop")


def _choose_task_map(task_map: str, xs: torch.Tensor) -> str:
    if task_map not in TASK_MAPS:
        raise ValueError(f"task_map must be one of {TASK_MAPS}, got {task_map!r}")
    if task_map != "auto":
        return task_map
    # Images ([T, N, C, H, W]) on CPU: a per-task loop beats vmap's grouped convolutions.
    return "loop" if (xs.device.type == "cpu" and xs.dim() >= 5) else "vmap"


def map_tasks(f: Callable[..., Any], in_dims: Sequence[int | None], task_map: str) -> Callable[..., Any]:
    """``f`` mapped over dim 0 of the arguments whose in_dim is 0 (others shared):
    ``vmap`` or a Python loop that stacks the per-task results (same semantics)."""
    if task_map == "vmap":
        return torch.func.vmap(f, in_dims=tuple(in_dims))

    def looped(*args: Any) -> Any:
        T = next(pytree.tree_leaves(a)[0].shape[0] for a, d in zip(args, in_dims) if d is not None)
        outs = []
        for t in range(T):
            targs = [a if d is None else pytree.tree_map(lambda z: z[t], a) for a, d in zip(args, in_dims)]
            outs.append(f(*targs))
        leaves0, spec = pytree.tree_flatten(outs[0])
        cols = [pytree.tree_leaves(o) for o in outs]
        return pytree.tree_unflatten([torch.stack([c[j] for c in cols]) for j in range(len(leaves0))], spec)

    return looped


@dataclass
class _Plan:
    """Static (non-tensor) description of one meta-step, passed to the Function."""

    fn: PureFn
    prob: MetaProblem
    task_map: str
    sgd_backend: str | None
    n_lr: int

    # --- per-task functions (unbatched; mapped over tasks by map_tasks) --------------
    def params(self, pa: Sequence[torch.Tensor], pf: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        d = dict(zip(self.prob.adapted, pa))
        d.update(zip(self.prob.fixed, pf))
        return d

    def loss(self, pa: tuple, pf: tuple, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.prob.loss_fn(self.fn(self.params(pa, pf), x), y)

    def support_grad(self, pa: tuple, pf: tuple, x: torch.Tensor, y: torch.Tensor) -> tuple:
        """g = ∇_θa Ls(θa, φ) of one task."""
        return torch.func.grad(self.loss, argnums=0)(pa, pf, x, y)

    def query_grad(self, with_fixed: bool) -> Callable[..., Any]:
        """(∇Lq, Lq) of one task; the gradient covers φ too when ``with_fixed``."""
        return torch.func.grad_and_value(self.loss, argnums=(0, 1) if with_fixed else 0)

    def grad_and_hvp(self, with_fixed: bool) -> Callable[..., Any]:
        """(g, H u) of one task by forward-over-reverse: jvp of grad at θa along u.

        With ``with_fixed`` the gradient is w.r.t. (θa, φ), so the product is
        ((g_a, g_f), (H_aa u, H_fa u)): the tangent lives on θa only."""
        argnums = (0, 1) if with_fixed else 0

        def f(pa: tuple, pf: tuple, x: torch.Tensor, y: torch.Tensor, u: tuple) -> tuple:
            def g_of(a: tuple) -> Any:
                return torch.func.grad(self.loss, argnums=argnums)(a, pf, x, y)

            return torch.func.jvp(g_of, (pa,), (u,))

        return f


class _MetaStep(torch.autograd.Function):
    """forward(plan, *θa, *φ, *lr_tensors, xs, ys, xq, yq) -> M (0-d).

    Classic ``forward(ctx, ...)`` style rather than ``setup_context``: the forward's
    products the backward needs (θ_k, g_k, ∇Lq(θ_k)) are intermediates, not outputs.
    """

    @staticmethod
    def forward(ctx: Any, plan: _Plan, *flat: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        prob = plan.prob
        na, nf = len(prob.adapted), len(prob.fixed)
        theta_a = tuple(flat[:na])
        phi = tuple(flat[na:na + nf])
        lr_t = list(flat[na + nf:na + nf + plan.n_lr])
        xs, ys, xq, yq = flat[na + nf + plan.n_lr:]
        need_a = any(ctx.needs_input_grad[1:1 + na])
        need_f = any(ctx.needs_input_grad[1 + na:1 + na + nf])
        need_lr = any(ctx.needs_input_grad[1 + na + nf:1 + na + nf + plan.n_lr])
        need_any = need_a or need_f or need_lr
        second = not prob.first_order
        keep_states = need_any and second
        keep_g = need_lr and not second
        tm = plan.task_map

        support_grad = map_tasks(plan.support_grad, (None, None, 0, 0), tm)
        support_grad_b = map_tasks(plan.support_grad, (0, None, 0, 0), tm)
        if need_any:
            query = map_tasks(plan.query_grad(need_f), (0, None, 0, 0), tm)
        else:
            query = map_tasks(plan.loss, (0, None, 0, 0), tm)

        pa: tuple = theta_a
        states: list[tuple] = [theta_a]  # θ_0 is shared by the tasks (not expanded)
        gs: list[tuple] = []
        gq_a: list[tuple | None] = [None] * (prob.steps + 1)
        gq_f = [torch.zeros_like(p) for p in phi] if need_f else []
        total = torch.zeros((), dtype=xs.dtype, device=xs.device)
        for k in range(prob.steps):
            g = (support_grad if k == 0 else support_grad_b)(pa, phi, xs, ys)
            if keep_g:
                gs.append(g)
            pa = tuple(ops.sgd_step(list(pa), list(g), prob.lr.sgd_lr(k, lr_t), backend=plan.sgd_backend))
            if keep_states and k + 1 < prob.steps:
                states.append(pa)
            w = prob.msl[k]
            if w == 0.0:
                continue
            if need_any:
                grads, val = query(pa, phi, xq, yq)
                if need_f:
                    ga, gf = grads
                    for acc, gfi in zip(gq_f, gf):
                        acc.add_(gfi.sum(0), alpha=w)
                else:
                    ga = grads
                gq_a[k + 1] = ga
            else:
                val = query(pa, phi, xq, yq)
            total = total + w * val.mean()

        if need_any:
            ctx.plan = plan
            ctx.flags = (need_a, need_f, need_lr)
            ctx.states, ctx.gs, ctx.gq_a, ctx.gq_f = states, gs, gq_a, gq_f
            ctx.shapes = [p.shape for p in theta_a]
            ctx.save_for_backward(*flat)  # version counters catch in-place edits of the inputs
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:  # type: ignore[override]
        plan: _Plan = ctx.plan
        prob = plan.prob
        need_a, need_f, need_lr = ctx.flags
        flat = ctx.saved_tensors
        na, nf = len(prob.adapted), len(prob.fixed)
        phi = tuple(flat[na:na + nf])
        lr_t = list(flat[na + nf:na + nf + plan.n_lr])
        xs, ys = flat[na + nf + plan.n_lr], flat[na + nf + plan.n_lr + 1]
        T = prob.T
        scale = grad_out / T  # every term of M carries 1/T and the incoming gradient
        K = prob.steps
        second = not prob.first_order
        tm = plan.task_map

        # v_K = (w_K/T) ∇Lq(θ_K), per task [T, *shape_i]
        if prob.msl[K - 1] != 0.0:
            v = [scale * prob.msl[K - 1] * gi for gi in ctx.gq_a[K]]
        else:
            v = [torch.zeros((T, *s), dtype=xs.dtype, device=xs.device) for s in ctx.shapes]
        dlr = [torch.zeros_like(t) for t in lr_t] if need_lr else []
        dphi = [scale * w for w in ctx.gq_f] if need_f else []
        if second:
            hvp0 = map_tasks(plan.grad_and_hvp(need_f), (None, None, 0, 0, 0), tm)
            hvpb = map_tasks(plan.grad_and_hvp(need_f), (0, None, 0, 0, 0), tm)
        for k in reversed(range(K)):
            if second:
                u = tuple(prob.lr.rate(k, i, lr_t) * vi for i, vi in enumerate(v))  # α_k ⊙ v_{k+1}
                g, hv = (hvp0 if k == 0 else hvpb)(ctx.states[k], phi, xs, ys, u)
                if need_f:
                    (g_a, _), (hv_a, hv_f) = g, hv
                    for acc, h in zip(dphi, hv_f):
                        acc.sub_(h.sum(0))  # dφ −= H_{φθ}(α_k ⊙ v_{k+1})
                else:
                    g_a, hv_a = g, hv
            else:
                g_a = ctx.gs[k] if need_lr else None
            if need_lr:
                for i, (gi, vi) in enumerate(zip(g_a, v)):
                    prob.lr.reduce_grad(k, i, -(gi * vi), dlr)  # dα_k += −g_k ⊙ v_{k+1}
            if second:
                v = [vi - hi for vi, hi in zip(v, hv_a)]  # v_k = v_{k+1} − H_k(α_k ⊙ v_{k+1})
            if k >= 1 and prob.msl[k - 1] != 0.0:
                v = [vi + scale * prob.msl[k - 1] * gi for vi, gi in zip(v, ctx.gq_a[k])]
        dtheta = [vi.sum(0) for vi in v] if need_a else [None] * na
        if not need_f:
            dphi = [None] * nf
        if not need_lr:
            dlr = [None] * plan.n_lr
        return (None, *dtheta, *dphi, *dlr, None, None, None, None)


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
) -> torch.Tensor:
    """The meta-loss M by the generic fast path; arguments as
    :func:`fastmaml.reference.maml_loss`. ``backend`` selects ``ops.sgd_step``'s
    backend (None/'auto': automatic). Returns a 0-d tensor whose backward is the
    adjoint (once-differentiable)."""
    prob = check_problem(fn, params, lrs, xs, ys, xq, yq, steps=steps, first_order=first_order, loss=loss,
                         msl_weights=msl_weights, adapt=adapt)
    plan = _Plan(fn, prob, _choose_task_map(task_map, xs), None if backend in (None, "auto") else backend,
                 len(prob.lr.tensors))
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
) -> dict[str, torch.Tensor]:
    """Per-task adapted parameters θ_{t,steps} (no graph), dict name -> [T, *shape];
    tensors not adapted are expanded views of θ."""
    prob = check_problem(fn, params, lrs, xs, ys, xs, ys, steps=steps, first_order=True, loss=loss,
                         msl_weights=None, adapt=adapt)
    plan = _Plan(fn, prob, _choose_task_map(task_map, xs), None if backend in (None, "auto") else backend,
                 len(prob.lr.tensors))
    T = prob.T
    with torch.no_grad():
        pa = tuple(params[n].detach() for n in prob.adapted)
        phi = tuple(params[n].detach() for n in prob.fixed)
        lr_t = [t.detach() for t in prob.lr.tensors]
        for k in range(prob.steps):
            g = map_tasks(plan.support_grad, (None if k == 0 else 0, None, 0, 0), plan.task_map)(pa, phi, xs, ys)
            pa = tuple(ops.sgd_step(list(pa), list(g), prob.lr.sgd_lr(k, lr_t), backend=plan.sgd_backend))
    out = dict(zip(prob.adapted, pa))
    out.update({n: p.expand(T, *p.shape) for n, p in zip(prob.fixed, phi)})
    return {n: out[n] for n in prob.names}


def predict(fn: PureFn, fast: Mapping[str, torch.Tensor], xq: torch.Tensor, task_map: str = "auto") -> torch.Tensor:
    """fn(fast_t, xq_t) for every task t: fast holds [T, *shape] tensors, xq [T, N, ...]."""
    tm = _choose_task_map(task_map, xq)
    return map_tasks(lambda p, x: fn(p, x), (0, 0), tm)(dict(fast), xq)
