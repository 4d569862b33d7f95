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
(``fwd``, ``bwd``, ``bwd_bwd`` in :mod:`fastmaml.ops.batch_norm_library`, which also holds
the ``torch.library`` custom ops a compiled graph calls) → :class:`_BN` and :class:`_BNBackward`
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

from fastmaml import _ext, backends
from fastmaml._autograd import once_differentiable
from fastmaml.ops import batch_norm_library as lib
from fastmaml.ops.batch_norm_library import BACKENDS
from fastmaml.ops.batch_norm_library import bwd as _bwd
from fastmaml.ops.batch_norm_library import bwd_bwd as _bwd_bwd
from fastmaml.ops.batch_norm_library import fwd as _fwd
from fastmaml.ops.batch_norm_library import view3 as _view3


def available() -> bool:
    """Whether the C++ kernels are built (the fused BatchNorm is used only then)."""
    return _ext._C is not None


def _kernels(x: torch.Tensor) -> bool:
    """Whether the C++ kernels can take this call (the extension is built, CPU tensor)."""
    return _ext._C is not None and x.device.type == "cpu"


# ---- autograd ---------------------------------------------------------------------------
class _BNBackward(torch.autograd.Function):
    """(gy, x, w) -> (dx, dw, db): the backward of batch-statistics BN, itself
    differentiable once (its backward is the closed-form double backward)."""

    @staticmethod
    def forward(ctx: Any, gy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, mean: torch.Tensor,
                rstd: torch.Tensor, kernels: bool) -> tuple:
        gy = lib.like(gy, x)
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
    g_gy, g_x, g_w = _bwd_bwd(a, bw, bb, gy, x, w, mean, rstd, ctx.kernels)
    return g_gy, g_x, g_w, None, None, None


_double_backward = once_differentiable(_bn_double_backward, lib.THIRD)


class _BN(torch.autograd.Function):
    """(x, w, b) -> y: batch-statistics BatchNorm; x a contiguous [N, C, S], or with the
    kernels a 4-D channels_last tensor (``batch_norm_library.kernel_input``; y, dx in
    its layout)."""

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
            dx, dw, db = _bwd(lib.like(gy, x), x, w, mean, rstd, ctx.kernels, need_dx=ctx.needs_input_grad[0])
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
    if torch.compiler.is_compiling():  # one opaque node per level for Dynamo/AOTAutograd (fastmaml::batch_norm)
        return lib.batch_norm_op(x, weight, bias, float(eps), "cpu" if kernels else "reference")[0]
    # the kernels take a channels_last x as it is (a conv on channels_last inputs returns
    # one); the formulas and other layouts see a contiguous [N, C, S] view
    xk = lib.kernel_input(x) if kernels else _view3(x)
    return _BN.apply(xk, weight, bias, float(eps), kernels).view(x.shape)


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
