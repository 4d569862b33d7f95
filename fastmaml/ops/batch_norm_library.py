"""``torch.ops.fastmaml.batch_norm``, ``batch_norm_backward`` and
``batch_norm_double_backward``: the three levels of :func:`fastmaml.ops.batch_norm` as
``torch.library`` custom ops, and their launchers.

Eager calls of :func:`fastmaml.ops.batch_norm` keep their lean ``autograd.Function``\\ s
(:mod:`fastmaml.ops._batch_norm`); under ``torch.compile`` the same launchers run behind
these ops, so each level is one graph node and AOTAutograd traces the backward through
the registered autograd (docs/DESIGN.md §7): the forward's autograd is the backward op,
whose autograd is the double backward op, whose own backward raises (third derivatives
are not implemented). Backends (an explicit string argument): ``cpu`` (the C++ kernels,
CPU tensors) and ``reference`` (the closed-form formulas of
:mod:`fastmaml.reference.batch_norm` in torch ops, any device). x is ``[N, C, *]``;
nothing is mutated and every output is a new tensor.

The batch statistics (mean, rstd) are outputs of the forward op and inputs of the two
backward ops, and they are functions of x: the closed forms account for that
dependency in g_x. So mean and rstd are marked non-differentiable, and a backward op
asked for a gradient with respect to them (a caller who made them differentiable
inputs) raises instead of returning a gradient that ignores them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastmaml import _ext, codes
from fastmaml import reference as ref

BACKENDS = ("cpu", "reference")


def view3(x: Tensor) -> Tensor:
    """x [N, C, *] as a contiguous [N, C, S]."""
    return x.contiguous().view(x.shape[0], x.shape[1], -1)


def layout(x: Tensor) -> int:
    """The kernels' layout of x: 1 for a 4-D channels_last tensor (its memory an [N, H, W, C]
    array; what convolutions on channels_last inputs return), else 0 (a contiguous
    [N, C, L])."""
    return int(x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last))


def kernel_input(x: Tensor) -> Tensor:
    """x [N, C, *] as the kernels take it: a 4-D channels_last x as it is, else
    :func:`view3`."""
    return x if layout(x) else view3(x)


def like(t: Tensor, x: Tensor) -> Tensor:
    """t (x's shape) in x's kernel layout: channels_last where x is, else contiguous."""
    return t.contiguous(memory_format=torch.channels_last) if layout(x) else t.contiguous()


def _nclk(x: Tensor) -> tuple[int, int, int, int]:
    """(layout, N, C, L) of a kernel input (:func:`kernel_input`)."""
    N, C = x.shape[0], x.shape[1]
    return layout(x), N, C, x.numel() // max(1, N * C)


def _ptr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _c(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


# ---- launchers: each level on the C++ kernels (kernels=True) or as the formulas --------
def fwd(x: Tensor, w: Tensor, b: Tensor, eps: float, kernels: bool) -> tuple:
    """(y, mean, rstd) of x: a contiguous [N, C, L]; with the kernels also a 4-D
    channels_last x (:func:`kernel_input`), y then channels_last too."""
    if not kernels:
        return ref.batch_norm_forward(x, w, b, eps)
    lay, N, C, L = _nclk(x)
    w, b = w.contiguous(), b.contiguous()
    y = torch.empty_like(x)  # x's layout
    mean, rstd = x.new_empty(C), x.new_empty(C)
    _ext.ext().batch_norm_fwd_cpu(codes.DTYPE[x.dtype], lay, N, C, L, x.data_ptr(), w.data_ptr(), b.data_ptr(),
                                  y.data_ptr(), mean.data_ptr(), rstd.data_ptr(), eps, torch.get_num_threads())
    return y, mean, rstd


def bwd(gy: Tensor, x: Tensor, w: Tensor, mean: Tensor, rstd: Tensor, kernels: bool, need_dx: bool = True) -> tuple:
    """(dx or None, dw, db); x a kernel input (:func:`fwd`), gy in its layout (:func:`like`)."""
    if not kernels:
        dx, dw, db = ref.batch_norm_backward(gy, x, w, mean, rstd)
        return (dx if need_dx else None), dw, db
    lay, N, C, L = _nclk(x)
    w = w.contiguous()
    dx = torch.empty_like(x) if need_dx else None
    dw, db = w.new_empty(C), w.new_empty(C)
    _ext.ext().batch_norm_bwd_cpu(codes.DTYPE[x.dtype], lay, N, C, L, x.data_ptr(), w.data_ptr(), mean.data_ptr(),
                                  rstd.data_ptr(), gy.data_ptr(), _ptr(dx), dw.data_ptr(), db.data_ptr(),
                                  torch.get_num_threads())
    return dx, dw, db


def bwd_bwd(a: Tensor | None, bw: Tensor | None, bb: Tensor | None, gy: Tensor, x: Tensor, w: Tensor, mean: Tensor,
            rstd: Tensor, kernels: bool) -> tuple:
    """(g_gy, g_x, g_w) for the cotangents (a, bw, bb) of (dx, dw, db); None = zero. x a
    kernel input (:func:`fwd`), gy and a in its layout (:func:`like`)."""
    if not kernels:
        return ref.batch_norm_double_backward(a, bw, bb, gy, x, w, mean, rstd)
    lay, N, C, L = _nclk(x)
    w, bw, bb = w.contiguous(), _c(bw), _c(bb)
    a = None if a is None else like(a, x)
    g_gy, g_x, g_w = torch.empty_like(x), torch.empty_like(x), w.new_empty(C)
    _ext.ext().batch_norm_bwd_bwd_cpu(codes.DTYPE[x.dtype], lay, N, C, L, x.data_ptr(), w.data_ptr(), mean.data_ptr(),
                                      rstd.data_ptr(), gy.data_ptr(), _ptr(a), _ptr(bw), _ptr(bb), g_gy.data_ptr(),
                                      g_x.data_ptr(), g_w.data_ptr(), torch.get_num_threads())
    return g_gy, g_x, g_w


def _kernels(backend: str, name: str) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"fastmaml::{name}: backend must be one of {BACKENDS}, got {backend!r}")
    return backend == "cpu"


# ---- the ops ------------------------------------------------------------------------------
@torch.library.custom_op("fastmaml::batch_norm", mutates_args=())
def batch_norm_op(x: Tensor, weight: Tensor, bias: Tensor, eps: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(y of x's shape, mean [C], rstd [C]) of checked arguments."""
    y, mean, rstd = fwd(view3(x), weight, bias, float(eps), _kernels(backend, "batch_norm"))
    return y.reshape(x.shape).contiguous(), mean.contiguous(), rstd.contiguous()


@batch_norm_op.register_fake
def _fake_fwd(x, weight, bias, eps, backend):
    C = x.shape[1]
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(C), x.new_empty(C)


@torch.library.custom_op("fastmaml::batch_norm_backward", mutates_args=())
def batch_norm_backward_op(gy: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor,
                           backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(dx of x's shape, dweight, dbias) for the cotangent gy of y."""
    dx, dw, db = bwd(view3(gy), view3(x), weight, mean.contiguous(), rstd.contiguous(),
                     _kernels(backend, "batch_norm_backward"))
    return dx.reshape(x.shape).contiguous(), dw.contiguous(), db.contiguous()


@batch_norm_backward_op.register_fake
def _fake_bwd(gy, x, weight, mean, rstd, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight), torch.empty_like(weight)


@torch.library.custom_op("fastmaml::batch_norm_double_backward", mutates_args=())
def batch_norm_double_backward_op(a: Tensor | None, bw: Tensor | None, bb: Tensor | None, gy: Tensor, x: Tensor,
                                  weight: Tensor, mean: Tensor, rstd: Tensor,
                                  backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(g_gy, g_x of x's shape, g_weight) for the cotangents (a, bw, bb) of the
    backward's (dx, dweight, dbias); None stands for zero."""
    g_gy, g_x, g_w = bwd_bwd(None if a is None else view3(a), bw, bb, view3(gy), view3(x), weight,
                             mean.contiguous(), rstd.contiguous(), _kernels(backend, "batch_norm_double_backward"))
    return g_gy.reshape(x.shape).contiguous(), g_x.reshape(x.shape).contiguous(), g_w.contiguous()


@batch_norm_double_backward_op.register_fake
def _fake_bwd_bwd(a, bw, bb, gy, x, weight, mean, rstd, backend):
    like = torch.empty_like(x, memory_format=torch.contiguous_format)
    return like, torch.empty_like(like), torch.empty_like(weight)


THIRD = ("fastmaml.ops.batch_norm: the double backward of batch_norm is not differentiable again (third "
         "derivatives through it are not implemented); use torch.nn.functional.batch_norm for those")
_STATS = ("fastmaml::{}: mean and rstd are x's batch statistics (outputs of fastmaml::batch_norm, "
          "non-differentiable; the closed form accounts for them through x), got them requiring grad")


def _setup_fwd(ctx, inputs, output):
    x, weight, _, _, backend = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.backend = backend
    ctx.save_for_backward(x, weight, mean, rstd)


def _backward_fwd(ctx, gy, _gmean, _grstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = batch_norm_backward_op(gy, x, weight, mean, rstd, ctx.backend)
    return dx, dw, db, None, None


def _setup_bwd(ctx, inputs, output):
    gy, x, weight, mean, rstd, backend = inputs
    ctx.backend = backend
    ctx.save_for_backward(gy, x, weight, mean, rstd)


def _backward_bwd(ctx, a, bw, bb):
    if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
        raise RuntimeError(_STATS.format("batch_norm_backward"))
    gy, x, weight, mean, rstd = ctx.saved_tensors
    g_gy, g_x, g_w = batch_norm_double_backward_op(a, bw, bb, gy, x, weight, mean, rstd, ctx.backend)
    return g_gy, g_x, g_w, None, None, None


def _setup_bwd_bwd(ctx, inputs, output):
    pass


def _backward_bwd_bwd(ctx, *grads):
    raise RuntimeError(THIRD)


batch_norm_op.register_autograd(_backward_fwd, setup_context=_setup_fwd)
batch_norm_backward_op.register_autograd(_backward_bwd, setup_context=_setup_bwd)
batch_norm_double_backward_op.register_autograd(_backward_bwd_bwd, setup_context=_setup_bwd_bwd)


__all__ = ["batch_norm_op", "batch_norm_backward_op", "batch_norm_double_backward_op", "fwd", "bwd", "bwd_bwd",
           "view3", "kernel_input", "like", "layout", "THIRD", "BACKENDS"]
