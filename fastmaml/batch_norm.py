"""BatchNorm in batch-statistics mode with a cheap, exact double backward.

MAML's second-order meta-gradient differentiates the support gradient once more (one
Hessian-vector product per task and inner step). Through ``batch_norm`` PyTorch does
that with ``batchnorm_double_backward``, a composite of ~40 full-size elementwise and
reduction ops: on the 2-core CPU it was 45 % of a miniImageNet task's HVP (266 of
590 ms, torch.profiler, 25 support images). This module computes the same three
levels — forward, backward, double backward — in closed form, each as one reduction
pass and one elementwise pass per channel (C++/OpenMP kernels, ``csrc/batch_norm_cpu.cpp``;
the same formulas in PyTorch ops where the extension is not built).

Math, per channel, over its M = N·S values (x viewed as [N, C, S]); r = 1/sqrt(σ² + ε)
with the biased batch variance σ², x̂ = (x − μ) r:

* forward:  y = γ x̂ + β
* backward (gy):  dβ = Σ gy,  dγ = Σ gy x̂,  dx = γ r (gy − Σgy/M − x̂ Σ(gy x̂)/M)
* double backward (cotangents a for dx, bγ for dγ, bβ for dβ); with A = Σa,
  Ax = Σ a x̂, Sg = Σ gy, Sgx = Σ gy x̂, Sag = Σ a gy:

      g_gy = γ r (a − A/M − x̂ Ax/M) + bγ x̂ + bβ
      g_γ  = r (Sag − Sg A/M − Ax Sgx/M)
      g_x  = −(r/M) γ g_γ x̂ − (γ r² Sgx/M)(a − A/M − x̂ Ax/M)
             + r (bγ − γ r Ax/M)(gy − Sg/M − x̂ Sgx/M)

  (from ∂x̂_j/∂x_i = r(δ_ij − 1/M − x̂_i x̂_j/M) and ∂r/∂x_i = −r² x̂_i/M). The tests
  check all three against PyTorch's autograd of ``F.batch_norm`` in float64
  (gradcheck, gradgradcheck) and the MAML meta-gradients of BatchNorm networks
  against the reference.

:func:`batch_norm` is differentiable twice (the third derivative raises); the generic
MAML path routes ``F.batch_norm`` calls of the model to it with
``fastmaml.maml.batch_norm_mode.FusedBatchNorm`` (a ``TorchFunctionMode``) where it
applies: training mode without running statistics, affine, float32/float64 on the CPU,
outside torch.func transforms.
"""

from __future__ import annotations

from typing import Any

import torch

from fastmaml import _ext
from fastmaml._autograd import once_differentiable


def _view3(x: torch.Tensor) -> torch.Tensor:
    """x [N, C, *] as a contiguous [N, C, S]."""
    return x.contiguous().view(x.shape[0], x.shape[1], -1)


def _bc(v: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, 1)


# --- the three levels in PyTorch ops (fallback and twin of the C++ kernels) ------------
def _fwd_torch(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> tuple:
    mean = x.mean(dim=(0, 2))
    var = (x - _bc(mean)).square().mean(dim=(0, 2))
    rstd = (var + eps).rsqrt()
    y = (x - _bc(mean)) * _bc(rstd * w) + _bc(b)
    return y, mean, rstd


def _bwd_torch(gy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor) -> tuple:
    m = x.shape[0] * x.shape[2]
    xh = (x - _bc(mean)) * _bc(rstd)
    sg = gy.sum(dim=(0, 2))
    sgx = (gy * xh).sum(dim=(0, 2))
    dx = _bc(w * rstd) * (gy - _bc(sg / m) - xh * _bc(sgx / m))
    return dx, sgx, sg


def _bwd_bwd_torch(a: torch.Tensor | None, bw: torch.Tensor | None, bb: torch.Tensor | None, gy: torch.Tensor,
                   x: torch.Tensor, w: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor) -> tuple:
    m = x.shape[0] * x.shape[2]
    xh = (x - _bc(mean)) * _bc(rstd)
    sg = gy.sum(dim=(0, 2))
    sgx = (gy * xh).sum(dim=(0, 2))
    zero = torch.zeros_like(w)
    bw = zero if bw is None else bw
    bb = zero if bb is None else bb
    if a is None:
        g_gy = xh * _bc(bw) + _bc(bb)
        g_w = zero
        g_x = _bc(rstd * bw) * (gy - _bc(sg / m) - xh * _bc(sgx / m))
        return g_gy, g_x, g_w
    A = a.sum(dim=(0, 2))
    ax = (a * xh).sum(dim=(0, 2))
    sag = (a * gy).sum(dim=(0, 2))
    pa = a - _bc(A / m) - xh * _bc(ax / m)  # the BN backward shape of a
    g_gy = _bc(w * rstd) * pa + xh * _bc(bw) + _bc(bb)
    g_w = rstd * (sag - sg * A / m - ax * sgx / m)
    pg = gy - _bc(sg / m) - xh * _bc(sgx / m)
    g_x = (xh * _bc(-(rstd / m) * w * g_w) - pa * _bc(w * rstd * rstd * sgx / m)
           + pg * _bc(rstd * (bw - w * rstd * ax / m)))
    return g_gy, g_x, g_w


_DTYPE_CODE = {torch.float32: 0, torch.float64: 1}


def available() -> bool:
    """Whether the C++ kernels are built (the fused BatchNorm is used only then)."""
    return _ext._C is not None


def _kernels(x: torch.Tensor) -> bool:
    """Whether the C++ kernels take this call (the extension is built, CPU tensor)."""
    return _ext._C is not None and x.device.type == "cpu"


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _c(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


def _fwd(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> tuple:
    """(y, mean, rstd) of a contiguous [N, C, L] x."""
    if not _kernels(x):
        return _fwd_torch(x, w, b, eps)
    N, C, L = x.shape
    w, b = w.contiguous(), b.contiguous()
    y = torch.empty_like(x)
    mean, rstd = x.new_empty(C), x.new_empty(C)
    _ext.ext().batch_norm_fwd_cpu(_DTYPE_CODE[x.dtype], N, C, L, x.data_ptr(), w.data_ptr(), b.data_ptr(),
                                  y.data_ptr(), mean.data_ptr(), rstd.data_ptr(), eps, torch.get_num_threads())
    return y, mean, rstd


def _bwd(gy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
         need_dx: bool = True) -> tuple:
    """(dx or None, dw, db); gy and x contiguous [N, C, L]."""
    if not _kernels(x):
        dx, dw, db = _bwd_torch(gy, x, w, mean, rstd)
        return (dx if need_dx else None), dw, db
    N, C, L = x.shape
    w = w.contiguous()
    dx = torch.empty_like(x) if need_dx else None
    dw, db = w.new_empty(C), w.new_empty(C)
    _ext.ext().batch_norm_bwd_cpu(_DTYPE_CODE[x.dtype], N, C, L, x.data_ptr(), w.data_ptr(), mean.data_ptr(),
                                  rstd.data_ptr(), gy.data_ptr(), _ptr(dx), dw.data_ptr(), db.data_ptr(),
                                  torch.get_num_threads())
    return dx, dw, db


def _bwd_bwd(a: torch.Tensor | None, bw: torch.Tensor | None, bb: torch.Tensor | None, gy: torch.Tensor,
             x: torch.Tensor, w: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor) -> tuple:
    """(g_gy, g_x, g_w) for the cotangents (a, bw, bb) of (dx, dw, db); None = zero."""
    if not _kernels(x):
        return _bwd_bwd_torch(a, bw, bb, gy, x, w, mean, rstd)
    N, C, L = x.shape
    w, a, bw, bb = w.contiguous(), _c(a), _c(bw), _c(bb)
    g_gy, g_x, g_w = torch.empty_like(x), torch.empty_like(x), w.new_empty(C)
    _ext.ext().batch_norm_bwd_bwd_cpu(_DTYPE_CODE[x.dtype], N, C, L, x.data_ptr(), w.data_ptr(), mean.data_ptr(),
                                      rstd.data_ptr(), gy.data_ptr(), _ptr(a), _ptr(bw), _ptr(bb), g_gy.data_ptr(),
                                      g_x.data_ptr(), g_w.data_ptr(), torch.get_num_threads())
    return g_gy, g_x, g_w


class _BNBackward(torch.autograd.Function):
    """(gy, x, w) -> (dx, dw, db): the backward of batch-statistics BN, itself
    differentiable once (its backward is the closed-form double backward)."""

    @staticmethod
    def forward(ctx: Any, gy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, mean: torch.Tensor,
                rstd: torch.Tensor) -> tuple:
        gy = gy.contiguous()
        ctx.save_for_backward(gy, x, w)
        ctx.stats = (mean, rstd)
        return _bwd(gy, x, w, mean, rstd)

    @staticmethod
    def backward(ctx: Any, a: torch.Tensor | None, bw: torch.Tensor | None, bb: torch.Tensor | None) -> tuple:
        return _double_backward(ctx, a, bw, bb)


def _bn_double_backward(ctx: Any, a: torch.Tensor | None, bw: torch.Tensor | None, bb: torch.Tensor | None) -> tuple:
    gy, x, w = ctx.saved_tensors
    mean, rstd = ctx.stats
    g_gy, g_x, g_w = _bwd_bwd(None if a is None else a.contiguous(), bw, bb, gy, x, w, mean, rstd)
    return g_gy, g_x, g_w, None, None


_THIRD = ("fastmaml.batch_norm: the double backward of batch_norm is not differentiable again (third "
          "derivatives through it are not implemented); use torch.nn.functional.batch_norm for those")
_double_backward = once_differentiable(_bn_double_backward, _THIRD)


class _BN(torch.autograd.Function):
    """(x [N, C, S] contiguous, w, b) -> y: batch-statistics BatchNorm."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
        y, mean, rstd = _fwd(x, w, b, eps)
        ctx.save_for_backward(x, w)
        ctx.stats = (mean, rstd)
        return y

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple:
        x, w = ctx.saved_tensors
        mean, rstd = ctx.stats
        if torch.is_grad_enabled():  # create_graph: a differentiable backward
            dx, dw, db = _BNBackward.apply(gy, x, w, mean, rstd)
        else:
            dx, dw, db = _bwd(gy.contiguous(), x, w, mean, rstd, need_dx=ctx.needs_input_grad[0])
        return dx, dw, db, None


def batch_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)`` with the
    closed-form backward and double backward above. x: [N, C, *] float32/float64;
    weight, bias: [C] of x's dtype and device. On the CPU the C++ kernels run it (when
    the extension is built), elsewhere the same formulas in PyTorch ops."""
    _check(x, weight, bias, eps)
    return _run(x, weight, bias, eps)


def _run(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """:func:`batch_norm` on arguments already checked (by it, or by the mode's routing test)."""
    return _BN.apply(_view3(x), weight, bias, float(eps)).view(x.shape)


def _problem(x: Any, weight: Any, bias: Any, eps: Any) -> Exception | None:
    """What makes these arguments unfit for :func:`batch_norm` (an exception naming the
    argument), or None."""
    if not isinstance(x, torch.Tensor):
        return TypeError(f"batch_norm: x must be a tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float32, torch.float64):
        return TypeError(f"batch_norm: x must be float32 or float64, got {x.dtype}")
    if x.dim() < 2:
        return ValueError(f"batch_norm: x must be [N, C, *], got shape {tuple(x.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if not isinstance(t, torch.Tensor):
            return TypeError(f"batch_norm: {name} must be a tensor, got {type(t).__name__}")
        if t.shape != (x.shape[1],):
            return ValueError(f"batch_norm: {name} must have shape ({x.shape[1]},) (x's channels), "
                              f"got {tuple(t.shape)}")
        if t.dtype != x.dtype or t.device != x.device:
            return TypeError(f"batch_norm: {name} must be {x.dtype} on {x.device} like x, got {t.dtype} on {t.device}")
    if x.numel() // max(1, x.shape[1]) < 2:
        return ValueError(f"batch_norm: expected more than 1 value per channel, got x of shape {tuple(x.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        return ValueError(f"batch_norm: eps must be a number >= 0, got {eps!r}")
    return None


def _check(x: Any, weight: Any, bias: Any, eps: Any) -> None:
    err = _problem(x, weight, bias, eps)
    if err is not None:
        raise err
