"""The generic meta-step as one ``torch.autograd.Function`` (:class:`MetaStep`).

* forward: the K inner steps of every task, with NO autograd graph. Per step, the
  per-task support gradients g_{t,k} come from the plan's primitives and the update
  θ_{t,k+1} = θ_{t,k} − α_k ⊙ g_{t,k} is the fused multi-tensor ``ops.sgd_step``. The
  query losses (and their gradients, which the backward needs) are computed at the
  steps whose MSL weight w_k is non-zero. Kept for the backward: θ_{t,k} for
  k < K (second order) or g_{t,k} (first order with a learned lr), and ∇Lq(θ_{t,k}).
* backward: the adjoint recursion of docs/DESIGN.md §1,

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
is recomputing each step's support forward/backward once in the backward pass; where
the support graphs are small they are kept instead, within ``graph_memory_mb`` (see
:mod:`fastmaml.maml.plan`).

One task at a time (``plan.per_task``): when the per-task loop runs its tasks one after
another and its HVPs per task too (large inputs), the forward runs each task's inner
loop, query loss *and adjoint* before the next task's, keeping only that task's
meta-gradient (computed for an incoming gradient of 1 — the meta-gradient is linear in
it — and scaled in the backward). Memory holds one task's graphs and activations
instead of all T tasks'; the meta-gradient is then computed in the forward, so only
when one is needed (grad mode on and some input requiring grad).

The meta-loss is once-differentiable: its backward is the adjoint above, run without
a graph; a double backward through it raises a RuntimeError.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fastmaml import ops
from fastmaml._autograd import once_differentiable as _once_differentiable
from fastmaml.maml.plan import Plan
from fastmaml.maml.tasks import confined

_DOUBLE_BACKWARD = (
    "fastmaml: the MAML meta-loss is once-differentiable: its backward is the adjoint recursion run "
    "without an autograd graph, so the meta-gradient cannot be differentiated again (double backward / "
    "create_graph=True). Use backend='reference' (unrolled autograd) if you need higher derivatives."
)


def once_differentiable(backward: Callable[..., tuple]) -> Callable[..., tuple]:
    """The meta-step's backward runs without a graph; a double backward raises (see
    :func:`fastmaml._autograd.once_differentiable`)."""
    return _once_differentiable(backward, _DOUBLE_BACKWARD)


def inner_update(pa: tuple, g: tuple, lr: object, backend: str | None) -> tuple:
    """θ_{k+1} = θ_k − α_k ⊙ g_k by the fused ``ops.sgd_step``. Gradients that come out of
    vmap/autograd may be non-contiguous views (e.g. of a transposed weight); the kernels
    take contiguous tensors, so those are compacted first (a no-op otherwise)."""
    return tuple(ops.sgd_step([p.contiguous() for p in pa], [x.contiguous() for x in g], lr, backend=backend))



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


def _forward_pass(plan: Plan, theta_a: tuple, phi: tuple, lr_t: list, xs: torch.Tensor, ys: torch.Tensor,
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
    hook = plan.step_hook
    for k in range(prob.steps):
        if hook is not None:
            hook(k, True)
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
        pa = inner_update(pa, g, prob.lr.sgd_lr(k, lr_t), plan.sgd_backend)
        del g
        if keep_states and k + 1 < prob.steps:
            states.append(pa)
        if hook is not None:
            hook(k, False)
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


def _adjoint(plan: Plan, st: _Pass, scale: torch.Tensor | float, flags: tuple[bool, bool, bool]) -> tuple:
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
                if plan.step_hook is not None:
                    plan.step_hook(k, False)
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


class MetaStep(torch.autograd.Function):
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
    def forward(ctx: Any, plan: Plan, *flat: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        na, nf = len(plan.prob.adapted), len(plan.prob.fixed)
        # Under torch.no_grad() (evaluation) needs_input_grad still says True: the
        # plan records the caller's grad mode so no meta-gradient work is done then.
        grad_on = plan.grad_enabled
        need_a = grad_on and any(ctx.needs_input_grad[1:1 + na])
        need_f = grad_on and any(ctx.needs_input_grad[1 + na:1 + na + nf])
        need_lr = grad_on and any(ctx.needs_input_grad[1 + na + nf:1 + na + nf + plan.n_lr])
        flags = (need_a, need_f, need_lr)
        with confined(plan.op_threads):
            return MetaStep._forward(ctx, plan, flags, flat)

    @staticmethod
    def _forward(ctx: Any, plan: Plan, flags: tuple[bool, bool, bool], flat: tuple) -> torch.Tensor:
        device = flat[-1].device
        ctx.rng = rng_state(device)
        total, ctx.st, ctx.pre = _run(plan, flat, flags)
        if (any(flags) and not plan.prob.first_order and plan.task_map == "loop" and plan.graph_budget < KEEP_ALL
                and not torch.equal(ctx.rng, rng_state(device))):
            # fn drew random numbers (F.dropout, randn_like): a backward that recomputed an
            # inner step would draw new ones and differentiate another function. Keep
            # every step's graph instead, so the backward uses the forward's draws, and run
            # the tasks in order (the draws then depend on the generator's state only).
            plan = dataclasses.replace(plan, graph_budget=KEEP_ALL, workers=1)
            ctx.rng = rng_state(device)
            total, ctx.st, ctx.pre = _run(plan, flat, flags)
        if any(flags):
            ctx.plan = plan
            ctx.flags = flags
            ctx.save_for_backward(*flat)  # version counters catch in-place edits of the inputs
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:  # type: ignore[override]
        plan: Plan = ctx.plan
        flat = ctx.saved_tensors  # raises if an input was modified in place, or the graph was freed
        with confined(plan.op_threads):
            return MetaStep._backward(ctx, plan, flat, grad_out)

    @staticmethod
    def _backward(ctx: Any, plan: Plan, flat: tuple, grad_out: torch.Tensor) -> tuple:
        if ctx.pre is None and ctx.st is None:
            # a second backward through a retained graph: the first one consumed the
            # forward's products (θ_k, kept graphs), so they are recomputed, from the
            # generator state the forward started from (the same random draws)
            device = flat[-1].device
            now = rng_state(device)
            set_rng_state(device, ctx.rng)
            try:
                _, ctx.st, ctx.pre = _run(plan, flat, ctx.flags)
            finally:
                set_rng_state(device, now)
        if ctx.pre is not None:
            grads = [None if g is None else g * grad_out for g in ctx.pre]
            ctx.pre = None
        else:
            dt, df, dl = _adjoint(plan, ctx.st, grad_out / plan.prob.T, ctx.flags)
            ctx.st = None
            grads = [*dt, *df, *dl]
        return (None, *grads, None, None, None, None)


KEEP_ALL = 1 << 62  # a graph budget that keeps every inner step's support graph


def _run(plan: Plan, flat: Sequence[torch.Tensor], flags: tuple[bool, bool, bool]) -> tuple:
    """The meta-step's forward: (M, the pass the adjoint needs or None, the meta-gradient
    already computed one task at a time or None)."""
    prob = plan.prob
    na, nf = len(prob.adapted), len(prob.fixed)
    theta_a = tuple(flat[:na])
    phi = tuple(flat[na:na + nf])
    lr_t = list(flat[na + nf:na + nf + plan.n_lr])
    xs, ys, xq, yq = flat[na + nf + plan.n_lr:]
    need_any = any(flags)
    T = prob.T
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
        return total, None, grads
    total, st = _forward_pass(plan, theta_a, phi, lr_t, xs, ys, xq, yq, flags)
    return total, (st if need_any else None), None


def rng_state(device: torch.device) -> torch.Tensor:
    """The state of the default generator that ``fn``'s random ops on ``device`` draw from."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.default_generator.get_state()


def set_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.default_generator.set_state(state)


_VMAP_HINT = ("fn cannot run under vmap over tasks ({}): set task_map='loop' (on a MAML module: "
              "maml.task_map = 'loop'), which maps tasks by a Python loop and, for random ops, keeps every inner "
              "step's graph so the backward sees the forward's draws; or use backend='reference'")


def vmap_error(e: RuntimeError) -> ValueError | None:
    """A ValueError naming the fix for vmap's refusals of random ops and of control
    flow that depends on tensor values in ``fn``; None for any other error."""
    msg = str(e)
    if "vmap" not in msg:
        return None
    if "random" in msg:
        return ValueError(_VMAP_HINT.format("it calls a random operation such as F.dropout or torch.randn_like"))
    if "data-dependent control flow" in msg or ".item()" in msg:
        return ValueError(_VMAP_HINT.format("its control flow depends on tensor values"))
    return None
