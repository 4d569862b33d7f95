"""``torch.ops.fastmaml.mlp_loss_and_grad`` and ``torch.ops.fastmaml.mlp_hvp``: the
per-task MLP kernels as ``torch.library`` custom ops, and their launchers.

Eager calls of :func:`fastmaml.ops.mlp_loss_and_grad` / :func:`fastmaml.ops.mlp_hvp`
check their arguments and call the launchers below directly; under ``torch.compile``
they call these ops instead, so Dynamo puts one node in the graph rather than breaking at
the pybind call (docs/DESIGN.md §7). The data-dependent check (class labels within
``[0, out_L)`` for ``loss="cross_entropy"``) runs inside the op, so a compiled graph keeps
it without a data-dependent branch in Python; while a CUDA graph is captured it is a
device-side assert (:func:`check_labels`, :func:`check_finite`: no host synchronisation).

Schema: tensors and tensor lists, every knob a string; the backend is an explicit
argument (``cpu``, ``cuda`` or ``triton``; device only picks the default in the public
functions, so ``backend="cuda"`` on CPU tensors in the emulated build and the Triton
interpreter keep working). The ``reference`` backend differentiates with autograd inside,
which an op's implementation cannot (it runs below the autograd dispatch key): the public
functions trace it as plain torch code, and the op refuses it with a ValueError.

The outputs are values, not differentiable functions of the inputs (like the eager
functions, which return detached tensors): the public functions pass detached inputs,
and no autograd formula is registered (a backward through the op raises PyTorch's "no
autograd formula" error rather than returning a silently missing gradient). Nothing is
mutated; every output is a new tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fastmaml import codes
from fastmaml._ext import cuda_launch, ext

KERNEL_BACKENDS = ("cpu", "cuda", "triton")


def triton_mlp():
    try:
        from fastmaml.triton import mlp as tmlp  # noqa: PLC0415 (lazy: triton is optional)

        return tmlp
    except (ImportError, AttributeError) as exc:
        raise RuntimeError(f"the triton backend of the MLP ops is not available in this build: {exc}") from exc


def _ptrs(ts: Sequence[Tensor]) -> list[int]:
    return [t.data_ptr() for t in ts]


def _dims(ws: Sequence[Tensor]) -> list[int]:
    return [int(ws[0].shape[-1]), *[int(W.shape[-2]) for W in ws]]


# ---- launchers (checked, contiguous arguments) -------------------------------------------
def launch_loss_and_grad(ws, bs, x, y, activation: str, loss: str, be: str):
    """(per-task loss [T], grad weights, grad biases) by the kernels of backend ``be``."""
    if be == "triton":
        lt, gw, gb = triton_mlp().mlp_loss_and_grad(ws, bs, x, y, activation=activation, loss=loss)
        return lt, list(gw), list(gb)
    T, N = int(x.shape[0]), int(x.shape[1])
    lt = x.new_empty(T)
    gw = [torch.empty_like(W) for W in ws]
    gb = [torch.empty_like(b) for b in bs]
    args = (codes.DTYPE[x.dtype], _dims(ws), codes.ACTIVATION[activation], codes.LOSS[loss], T, N, x.data_ptr(),
            y.data_ptr(), _ptrs(ws), _ptrs(bs), lt.data_ptr(), _ptrs(gw), _ptrs(gb))
    if be == "cpu":
        ext().mlp_loss_and_grad_cpu(*args)
    else:
        with cuda_launch(x.device) as (_, stream):
            ext().mlp_loss_and_grad_cuda(*args, stream)
    return lt, gw, gb


def launch_hvp(ws, bs, x, y, vw, vb, activation: str, loss: str, be: str):
    """(hv weights, hv biases) by the kernels of backend ``be``."""
    if be == "triton":
        hw, hb = triton_mlp().mlp_hvp(ws, bs, x, y, vw, vb, activation=activation, loss=loss)
        return list(hw), list(hb)
    T, N = int(x.shape[0]), int(x.shape[1])
    hw = [torch.empty_like(W) for W in ws]
    hb = [torch.empty_like(b) for b in bs]
    args = (codes.DTYPE[x.dtype], _dims(ws), codes.ACTIVATION[activation], codes.LOSS[loss], T, N, x.data_ptr(),
            y.data_ptr(), _ptrs(ws), _ptrs(bs), _ptrs(vw), _ptrs(vb), _ptrs(hw), _ptrs(hb))
    if be == "cpu":
        ext().mlp_hvp_cpu(*args)
    else:
        with cuda_launch(x.device) as (_, stream):
            ext().mlp_hvp_cuda(*args, stream)
    return hw, hb


# ---- data checks inside the ops -----------------------------------------------------------
def capturing(t: Tensor) -> bool:
    """Whether ``t``'s stream is being captured into a CUDA graph (where a host read of
    device data, ``.item()`` or ``bool()``, is an error)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def check_labels(name: str, y: Tensor, classes: int) -> None:
    """ValueError naming ``name`` when int64 labels ``y`` leave ``[0, classes)``; while a
    CUDA graph is captured, a device-side assert instead (no host synchronisation)."""
    if not y.numel():
        return
    if capturing(y):
        torch._assert_async(((y >= 0) & (y < classes)).all(), f"{name} holds labels outside [0, {classes})")
        return
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= classes:
        raise ValueError(f"{name} holds labels outside [0, {classes}): min {lo}, max {hi}")


def check_finite(name: str, t: Tensor) -> None:
    """ValueError naming ``name`` when float ``t`` holds NaN or Inf (a device-side assert
    while a CUDA graph is captured)."""
    if not (t.is_floating_point() and t.numel()):
        return
    ok = torch.isfinite(t).all()
    if capturing(t):
        torch._assert_async(ok, f"{name} contains NaN or Inf")
    elif not bool(ok):
        raise ValueError(f"{name} contains NaN or Inf")


# ---- the ops ------------------------------------------------------------------------------
def _op_arguments(name: str, ws, bs, x, y, loss: str, backend: str):
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"fastmaml::{name} runs the kernels (backend one of {KERNEL_BACKENDS}), got backend "
                         f"{backend!r}: call fastmaml.reference.{name} (plain torch code) instead")
    if loss == "cross_entropy":
        check_labels("y", y, int(ws[-1].shape[-2]))
    return ([t.contiguous() for t in ws], [t.contiguous() for t in bs], x.contiguous(), y.contiguous())


def _fresh(ts: list[Tensor], inputs: list[Tensor]) -> list[Tensor]:
    """The outputs as new tensors (a backend may hand back an input or a view)."""
    return [t.clone() if t._base is not None or any(t is i for i in inputs) else t for t in ts]


@torch.library.custom_op("fastmaml::mlp_loss_and_grad", mutates_args=())
def mlp_loss_and_grad_op(weights: list[Tensor], biases: list[Tensor], x: Tensor, y: Tensor, activation: str,
                         loss: str, backend: str) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Per-task loss ``[T]`` and gradients of checked arguments (see
    :func:`fastmaml.ops.mlp_loss_and_grad`)."""
    ws, bs, x, y = _op_arguments("mlp_loss_and_grad", weights, biases, x, y, loss, backend)
    lt, gw, gb = launch_loss_and_grad(ws, bs, x, y, activation, loss, backend)
    inputs = [*ws, *bs, x, y]
    return _fresh([lt], inputs)[0], _fresh(list(gw), inputs), _fresh(list(gb), inputs)


@mlp_loss_and_grad_op.register_fake
def _fake_loss_and_grad(weights, biases, x, y, activation, loss, backend):
    return x.new_empty(x.shape[0]), [torch.empty_like(W) for W in weights], [torch.empty_like(b) for b in biases]


@torch.library.custom_op("fastmaml::mlp_hvp", mutates_args=())
def mlp_hvp_op(weights: list[Tensor], biases: list[Tensor], x: Tensor, y: Tensor, v_weights: list[Tensor],
               v_biases: list[Tensor], activation: str, loss: str, backend: str) -> tuple[list[Tensor], list[Tensor]]:
    """Per-task Hessian-vector products of checked arguments (see :func:`fastmaml.ops.mlp_hvp`)."""
    ws, bs, x, y = _op_arguments("mlp_hvp", weights, biases, x, y, loss, backend)
    vw, vb = [t.contiguous() for t in v_weights], [t.contiguous() for t in v_biases]
    hw, hb = launch_hvp(ws, bs, x, y, vw, vb, activation, loss, backend)
    inputs = [*ws, *bs, *vw, *vb, x, y]
    return _fresh(list(hw), inputs), _fresh(list(hb), inputs)


@mlp_hvp_op.register_fake
def _fake_hvp(weights, biases, x, y, v_weights, v_biases, activation, loss, backend):
    return [torch.empty_like(W) for W in weights], [torch.empty_like(b) for b in biases]


__all__ = ["mlp_loss_and_grad_op", "mlp_hvp_op", "launch_loss_and_grad", "launch_hvp", "triton_mlp",
           "KERNEL_BACKENDS", "capturing", "check_labels", "check_finite"]
