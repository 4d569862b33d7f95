"""``batch_norm``: BatchNorm in batch-statistics mode with a cheap, exact double backward.

MAML's second-order meta-gradient differentiates the support gradient once more (one
Hessian-vector product per task and inner step). Through ``F.batch_norm`` PyTorch does
that with ``batchnorm_double_backward``, a composite of ~40 full-size elementwise and
reduction ops, a large share of a miniImageNet task's HVP (benchmarks/RESULTS.md, section
"fastmaml/ops/_batch_norm.py").
This op computes the same three levels — forward, backward, double backward — in closed
form, each as one reduction pass and one elementwise pass per channel. The math is in
:mod:`fastmaml.reference.batch_norm`.

Four faces (docs/DESIGN.md §3): kernels (``csrc/batch_norm/``, C++/OpenMP) → launchers
(:func:`_fwd`, :func:`_bwd`, :func:`_bwd_bwd`) → :class:`_BN` and :class:`_BNBackward`
(``torch.autograd.Function``; the second is the backward, itself differentiable once)
→ :func:`batch_norm`. Backends: ``cpu`` runs every level in the C++ kernels;
``reference`` runs the same levels as the closed-form PyTorch-ops formulas of
:mod:`fastmaml.reference.batch_norm` (any device). Either way :func:`batch_norm` is
differentiable twice (the third derivative raises). The tests check all three levels
against PyTorch's autograd of ``F.batch_norm`` in float64 (gradcheck, gradgradcheck)
and the twin :func:`fastmaml.reference.batch_norm`.
"""

from __future__ import annotations

from typing import Any

import torch

from fastmaml import _ext, backends, codes
from fastmaml import reference as ref
from fastmaml._autograd import once_differentiable

BACKENDS = ("cpu", "reference")


def available() -> bool:
    """Whether the C++ kernels are built (the fused BatchNorm is used only then)."""
    return _ext._C is not None


def _kernels(x: torch.Tensor) -> bool:
    """Whether the C++ kernels can take this call (the extension is built, CPU tensor)."""
    return _ext._C is not None and x.device.type == "cpu"


def _view3(x: torch.Tensor) -> torch.Tensor:
    """x [N, C, *] as a contiguous [N, C, S]."""
    return x.contiguous().view(x.shape[0], x.shape[1], -1)


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _c(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


# ---- launchers: each level on the C++ kernels (kernels=True) or as the formulas --------
def _fwd(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float, kernels: bool) -> tuple:
    """(y, mean, rstd) of a contiguous [N, C, L] x."""
    if not kernels:
        return ref.batch_norm_forward(x, w, b, eps)
    N, C, L = x.shape
    w, b = w.contiguous(), b.contiguous()
    y = torch.empty_like(x)
    mean, rstd = x.new_empty(C), x.new_empty(C)
    _ext.ext().batch_norm_fwd_cpu(codes.DTYPE[x.dtype], N, C, L, x.data_ptr(), w.data_ptr(), b.data_ptr(),
                                  y.data_ptr(), mean.data_ptr(), rstd.data_ptr(), eps, torch.get_num_threads())
    return y, mean, rstd


def _bwd(gy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
         kernels: bool, need_dx: bool = True) -> tuple:
    """(dx or None, dw, db); gy and x contiguous [N, C, L]."""
    if not kernels:
        dx, dw, db = ref.batch_norm_backward(gy, x, w, mean, rstd)
        return (dx if need_dx else None), dw, db
    N, C, L = x.shape
    w = w.contiguous()
    dx = torch.empty_like(x) if need_dx else None
    dw, db = w.new_empty(C), w.new_empty(C)
    _ext.ext().batch_norm_bwd_cpu(codes.DTYPE[x.dtype], N, C, L, x.data_ptr(), w.data_ptr(), mean.data_ptr(),
                                  rstd.data_ptr(), gy.data_ptr(), _ptr(dx), dw.data_ptr(), db.data_ptr(),
                                  torch.get_num_threads())
    return dx, dw, db


def _bwd_bwd(a: torch.Tensor | None, bw: torch.Tensor | None, bb: torch.Tensor | None, gy: torch.Tensor,
             x: torch.Tensor, w: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, kernels: bool) -> tuple:
    """(g_gy, g_x, g_w) for the cotangents (a, bw, bb) of (dx, dw, db); None = zero."""
    if not kernels:
        return ref.batch_norm_double_backward(a, bw, bb, gy, x, w, mean, rstd)
    N, C, L = x.shape
    w, a, bw, bb = w.contiguous(), _c(a), _c(bw), _c(bb)
    g_gy, g_x, g_w = torch.empty_like(x), torch.empty_like(x), w.new_empty(C)
    _ext.ext().batch_norm_bwd_bwd_cpu(codes.DTYPE[x.dtype], N, C, L, x.data_ptr(), w.data_ptr(), mean.data_ptr(),
                                      rstd.data_ptr(), gy.data_ptr(), _ptr(a), _ptr(bw), _ptr(bb), g_gy.data_ptr(),
                                      g_x.data_ptr(), g_w.data_ptr(), torch.get_num_threads())
    return g_gy, g_x, g_w


# ---- autograd ---------------------------------------------------------------------------
class _BNBackward(torch.autograd.Function):
    """(gy, x, w) -> (dx, dw, db): the backward of batch-statistics BN, itself
    differentiable once (its backward is the closed-form double backward)."""

    @staticmethod
    def forward(ctx: Any, gy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, mean: torch.Tensor,
                rstd: torch.Tensor, kernels: bool) -> tuple:
        gy = gy.contiguous()
        ctx.save_for_backward(gy, x, w)
        ctx.stats = (mean, rstd)
        ctx.kernels = kernels
        return _bwd(gy, x, w, mean, rstd, kernels)

    @staticmethod
    def backward(ctx: Any, a: torch.Tensor | None, bw: torch.Tensor | None, bb: torch.Tensor | None) -> tuple:
        return _double_backward(ctx, a, bw, bb)


def _bn_double_backward(ctx: Any, a: torch.Tensor | None, bw: torch.Tensor | None, bb: torch.Tensor | None) -> tuple:
    gy, x, w = ctx.saved_tensors
    mean, rstd = ctx.stats
    g_gy, g_x, g_w = _bwd_bwd(None if a is None else a.contiguous(), bw, bb, gy, x, w, mean, rstd, ctx.kernels)
    return g_gy, g_x, g_w, None, None, None


_THIRD = ("fastmaml.batch_norm: the double backward of batch_norm is not differentiable again (third "
          "derivatives through it are not implemented); use torch.nn.functional.batch_norm for those")
_double_backward = once_differentiable(_bn_double_backward, _THIRD)


class _BN(torch.autograd.Function):
    """(x [N, C, S] contiguous, w, b) -> y: batch-statistics BatchNorm."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float,
                kernels: bool) -> torch.Tensor:
        y, mean, rstd = _fwd(x, w, b, eps, kernels)
        ctx.save_for_backward(x, w)
        ctx.stats = (mean, rstd)
        ctx.kernels = kernels
        return y

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple:
        x, w = ctx.saved_tensors
        mean, rstd = ctx.stats
        if torch.is_grad_enabled():  # create_graph: a differentiable backward
            dx, dw, db = _BNBackward.apply(gy, x, w, mean, rstd, ctx.kernels)
        else:
            dx, dw, db = _bwd(gy.contiguous(), x, w, mean, rstd, ctx.kernels, need_dx=ctx.needs_input_grad[0])
        return dx, dw, db, None, None


# ---- public function --------------------------------------------------------------------
def batch_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5, *,
               backend: str | None = None) -> torch.Tensor:
    """``F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)`` with the
    closed-form backward and double backward. x: [N, C, *] float32/float64; weight,
    bias: [C] of x's dtype and device.

    backend: ``"cpu"`` (the C++ kernels; CPU tensors, the extension built),
    ``"reference"`` (the same closed-form levels in PyTorch ops, any device) or
    ``"auto"``/None: ``cpu`` where it can take the call, else ``reference``. (The
    ``FASTMAML_BACKEND`` variable is not read: this op has no cuda or triton backend.)"""
    _check(x, weight, bias, eps)
    return run_checked(x, weight, bias, eps, _pick(backend, x))


def _pick(backend: str | None, x: torch.Tensor) -> bool:
    """Whether the C++ kernels run the call (True) or the formulas (False)."""
    if backend is None or backend == "auto":
        return _kernels(x)
    if backend not in BACKENDS:
        raise ValueError(f"batch_norm: backend must be one of {BACKENDS} or 'auto', got {backend!r}")
    return backends.resolve(backend, x.device, "batch_norm") == "cpu"


def run_checked(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
         kernels: bool | None = None) -> torch.Tensor:
    """:func:`batch_norm` on arguments already checked (by it, or by the MAML layer's
    mode); ``kernels`` None: where they can take the call."""
    if kernels is None:
        kernels = _kernels(x)
    return _BN.apply(_view3(x), weight, bias, float(eps), kernels).view(x.shape)


def problem(x: Any, weight: Any, bias: Any, eps: Any) -> Exception | None:
    """What makes these arguments unfit for :func:`batch_norm` (an exception naming the
    argument, the expected and the actual value), or None."""
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
    err = problem(x, weight, bias, eps)
    if err is not None:
        raise err


__all__ = ["batch_norm", "available"]
