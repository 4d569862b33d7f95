"""``torch.ops.fastmaml.sgd_step`` and ``torch.ops.fastmaml.sgd_step_backward``: the
fused inner update and its fused backward as ``torch.library`` custom ops.

Eager calls of :func:`fastmaml.ops.sgd_step` keep their lean paths
(:mod:`fastmaml.ops._sgd_step.function`); under ``torch.compile`` the same kernels run
behind these ops, so the update is one graph node and AOTAutograd traces its backward
(docs/DESIGN.md §7). The lr's granularity is ``lr_kind`` (``codes.SGD_LR_*``) with the
Python float in ``lr_value`` and the lr tensors in ``lrs``; the backend is a string
argument. Outputs are new tensors (nothing mutated, no aliasing). The backward runs
the fused kernel when no graph of it is needed, else differentiable torch ops (double
backward: the second-order MAML meta-gradient of the generic path).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastmaml import codes
from fastmaml.ops._sgd_step import launch
from fastmaml.ops._sgd_step.checks import Spec


def spec_of(params: list[Tensor], grads: list[Tensor], lrs: list[Tensor], lr_kind: int, lr_value: float) -> Spec:
    """The launchers' :class:`Spec` of already-checked tensors."""
    g0 = grads[0]
    return Spec(len(grads), g0.shape[0], g0.dtype, g0.device,
                tuple(int(p.dim() == g.dim() - 1) for p, g in zip(params, grads)),
                tuple(g[0].numel() for g in grads), lr_kind, float(lr_value), False)


@torch.library.custom_op("fastmaml::sgd_step", mutates_args=())
def sgd_step_op(params: list[Tensor], grads: list[Tensor], lrs: list[Tensor], lr_kind: int, lr_value: float,
                backend: str) -> list[Tensor]:
    """θ'_i = θ_i − α_i ⊙ g_i for checked arguments (see :func:`fastmaml.ops.sgd_step`)."""
    params = [p.contiguous() for p in params]
    grads = [g.contiguous() for g in grads]
    lrs = [a.contiguous() for a in lrs]
    spec = spec_of(params, grads, lrs, lr_kind, lr_value)
    outs = [torch.empty_like(g) for g in grads]  # one allocation each: outputs never alias one another
    if backend == "reference":
        with torch.no_grad():
            for o, p, g, a in zip(outs, params, grads, launch._alphas(spec, lrs)):
                torch.sub(p, g * a, out=o)
        return outs
    launch.launch_forward(backend, spec, params, grads, lrs, outs)
    return outs


@sgd_step_op.register_fake
def _fake(params, grads, lrs, lr_kind, lr_value, backend):
    return [torch.empty_like(g) for g in grads]


@torch.library.custom_op("fastmaml::sgd_step_backward", mutates_args=())
def sgd_step_backward_op(v: list[Tensor], grads: list[Tensor], lrs: list[Tensor], shared: list[int], lr_kind: int,
                         lr_value: float, need_lr: bool, backend: str) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """(dθ, dg, dα) of the update by the fused backward kernel: dθ_i = Σ_t v_i for a
    shared θ_i (v_i itself otherwise, copied), dg_i = −α_i ⊙ v_i, dα = −Σ g ⊙ v at the
    lr's granularity (empty list without ``need_lr``)."""
    v = [x.contiguous() for x in v]
    grads = [g.contiguous() for g in grads]
    lrs = [a.contiguous() for a in lrs]
    n = len(v)
    spec = Spec(n, v[0].shape[0], v[0].dtype, v[0].device, tuple(int(s) for s in shared),
                tuple(x[0].numel() for x in v), lr_kind, float(lr_value), False)
    need_lr = need_lr and lr_kind != codes.SGD_LR_FLOAT
    if backend == "reference":
        dth, dg, dlr = launch.backward_torch(spec, v, grads, lrs, need_lr)
    else:
        dth, dg, dlr = launch.launch_backward(backend, spec, v, grads, lrs, [True] * n, [True] * n, need_lr)
    dth = [t.clone() if any(t is x for x in v) else t for t in dth]  # outputs must not alias inputs
    dlr_l = [] if dlr is None else (list(dlr) if isinstance(dlr, (list, tuple)) else [dlr])
    return list(dth), list(dg), [t.contiguous() for t in dlr_l]


@sgd_step_backward_op.register_fake
def _fake_bwd(v, grads, lrs, shared, lr_kind, lr_value, need_lr, backend):
    dth = [x.new_empty(x.shape[1:]) if s else torch.empty_like(x) for x, s in zip(v, shared)]
    dg = [torch.empty_like(x) for x in v]
    if not need_lr or lr_kind == codes.SGD_LR_FLOAT:
        return dth, dg, []
    if lr_kind == codes.SGD_LR_PER_ELEMENT:
        return dth, dg, [x.new_empty(x.shape[1:]) for x in v]
    return dth, dg, [v[0].new_empty((len(v),) if lr_kind == codes.SGD_LR_PER_TENSOR else ())]


def _setup_context(ctx, inputs, output):
    params, grads, lrs, lr_kind, lr_value, backend = inputs
    ctx.lr_kind, ctx.lr_value, ctx.backend = lr_kind, lr_value, backend
    ctx.shared = [int(p.dim() == g.dim() - 1) for p, g in zip(params, grads)]
    ctx.n = len(grads)
    ctx.save_for_backward(*grads, *lrs)


def _backward(ctx, v):
    n = ctx.n
    saved = ctx.saved_tensors
    grads, lrs = list(saved[:n]), list(saved[n:])
    nl = ctx.needs_input_grad[2]
    need_lr = bool(lrs) and bool(any(nl) if isinstance(nl, (list, tuple)) else nl)
    v = [torch.zeros_like(g) if x is None else x for x, g in zip(v, grads)]
    if torch.is_grad_enabled():  # a graph of the backward is wanted (second-order MAML): torch ops
        spec = Spec(n, grads[0].shape[0], grads[0].dtype, grads[0].device, tuple(ctx.shared),
                    tuple(g[0].numel() for g in grads), ctx.lr_kind, float(ctx.lr_value), False)
        dth, dg, dlr = launch.backward_torch(spec, v, grads, lrs, need_lr)
        dlr_l = [] if dlr is None else (list(dlr) if isinstance(dlr, (list, tuple)) else [dlr])
    else:
        dth, dg, dlr_l = sgd_step_backward_op(v, grads, lrs, ctx.shared, ctx.lr_kind, ctx.lr_value, need_lr,
                                              ctx.backend)
    return list(dth), list(dg), (list(dlr_l) if need_lr else [None] * len(lrs)), None, None, None


sgd_step_op.register_autograd(_backward, setup_context=_setup_context)


__all__ = ["sgd_step_op", "sgd_step_backward_op", "spec_of"]
