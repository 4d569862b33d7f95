"""Per-task batched MLP ops: ``mlp_loss_and_grad`` and ``mlp_hvp`` (docs/DESIGN.md §1, §2).

Shapes (the conventions of :mod:`fastmaml.reference.mlp`): ``weights[l]: [T, out_l, in_l]``,
``biases[l]: [T, out_l]``, ``x: [T, N, in_1]``; ``y: [T, N, out_L]`` float for
``loss="mse"`` or ``[T, N]`` int64 class labels for ``loss="cross_entropy"``. float32 or
float64, contiguous, all on one device.

Backends: ``reference`` (autograd), ``cpu`` (C++/OpenMP, one task per thread),
``cuda`` (one CTA per task), ``triton`` (:mod:`fastmaml.triton.mlp`). The per-task
algorithm of the cpu and cuda backends is one template in ``csrc/mlp/`` (``task.h``): forward with
stored activations, backward, and the HVP by Pearlmutter's R-operator.

The outputs are not differentiable (as in the reference: they are detached values);
the meta-gradient of a MAML step is computed by :func:`fastmaml.ops.maml_mlp`'s adjoint.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastmaml import _checks, backends, codes
from fastmaml import reference as ref
from fastmaml.ops import mlp_library as lib
from fastmaml.reference.mlp import ACTIVATIONS, LOSSES

MAX_LAYERS = codes.MLP_MAX_LAYERS


def check_activation_loss(activation: object, loss: object) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")


_FLOATS = tuple(codes.DTYPE)


def _layers_fast(weights, biases, per_task: bool):
    """The common valid case in a few µs (no message formatting); None when anything is
    off, and then the detailed checks below find and name the problem."""
    if not isinstance(weights, (list, tuple)) or not isinstance(biases, (list, tuple)):
        return None
    L = len(weights)
    if L == 0 or L != len(biases) or L > MAX_LAYERS:
        return None
    W0 = weights[0]
    if not isinstance(W0, torch.Tensor):
        return None
    dtype, device = W0.dtype, W0.device
    if dtype not in _FLOATS:
        return None
    nd = 3 if per_task else 2
    T = W0.shape[0] if per_task and W0.dim() == 3 else None
    dims = [W0.shape[-1]]
    for W, b in zip(weights, biases):
        if not (isinstance(W, torch.Tensor) and isinstance(b, torch.Tensor)):
            return None
        if W.dtype != dtype or b.dtype != dtype or W.device != device or b.device != device:
            return None
        ws, bsh = W.shape, b.shape
        if len(ws) != nd or ws[-1] != dims[-1] or ws[-2] < 1 or ws[-1] < 1:
            return None
        if per_task:
            if ws[0] != T or tuple(bsh) != (T, ws[1]):
                return None
        elif tuple(bsh) != (ws[0],):
            return None
        if not (W.is_contiguous() and b.is_contiguous()):
            return None
        dims.append(ws[-2])
    return list(weights), list(biases), dims, dtype, device


def check_layers(
    weights: object, biases: object, *, per_task: bool, names: tuple[str, str] = ("weights", "biases")
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int], torch.dtype, torch.device]:
    """Validate an MLP's parameter lists; returns them with the widths ``[d_0, ..., d_L]``.
    ``per_task``: ``W_l [T, out, in]``, ``b_l [T, out]``; else ``[out, in]``, ``[out]``."""
    fast = _layers_fast(weights, biases, per_task)
    if fast is not None:
        return fast
    wn, bn = names
    ws = _checks.tensor_list(wn, weights)
    bs = _checks.tensor_list(bn, biases)
    if len(ws) != len(bs):
        raise ValueError(f"{wn} and {bn} must have the same length, got {len(ws)} and {len(bs)}")
    if len(ws) > MAX_LAYERS:
        raise ValueError(f"{wn}: at most {MAX_LAYERS} layers are supported, got {len(ws)}")
    dtype, device = ws[0].dtype, ws[0].device
    lead = 1 if per_task else 0
    T = ws[0].shape[0] if per_task and ws[0].dim() == 3 else None
    dims: list[int] = []
    for l, (W, b) in enumerate(zip(ws, bs)):
        for name, t in ((f"{wn}[{l}]", W), (f"{bn}[{l}]", b)):
            _checks.float_dtype(name, t, dtype)
            _checks.same_device(name, t, device)
        if W.dim() != 2 + lead:
            want = "[T, out, in]" if per_task else "[out, in]"
            raise ValueError(f"{wn}[{l}] must be {want}, got shape {tuple(W.shape)}")
        out_f, in_f = W.shape[-2], W.shape[-1]
        if per_task:
            _checks.shape(f"{wn}[{l}]", W, (T, out_f, in_f))
            _checks.shape(f"{bn}[{l}]", b, (T, out_f))
        else:
            _checks.shape(f"{bn}[{l}]", b, (out_f,))
        if l == 0:
            dims.append(in_f)
        elif in_f != dims[-1]:
            raise ValueError(f"{wn}[{l}] takes {in_f} inputs but layer {l - 1} has {dims[-1]} outputs")
        if out_f < 1 or in_f < 1:
            raise ValueError(f"{wn}[{l}] has an empty dimension: shape {tuple(W.shape)}")
        dims.append(out_f)
        _checks.contiguous(f"{wn}[{l}]", W)
        _checks.contiguous(f"{bn}[{l}]", b)
    return ws, bs, dims, dtype, device


def labels_outside(y: torch.Tensor, classes: int) -> bool:
    """Whether the int64 labels ``y`` hold a value outside [0, classes)."""
    return bool(y.numel()) and (int(y.min()) < 0 or int(y.max()) >= classes)


def check_data(
    xname: str, x: object, yname: str, y: object, *, T: int | None, dims: list[int], loss: str,
    dtype: torch.dtype, device: torch.device, check_labels: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Validate ``x [T, N, d_0]`` and ``y``; returns (x, y, T, N)."""
    x = _checks.tensor(xname, x)
    y = _checks.tensor(yname, y)
    _checks.float_dtype(xname, x, dtype)
    _checks.same_device(xname, x, device)
    _checks.same_device(yname, y, device)
    if x.dim() != 3 or x.shape[2] != dims[0]:
        raise ValueError(f"{xname} must be [T, N, {dims[0]}], got shape {tuple(x.shape)}")
    if T is not None and x.shape[0] != T:
        raise ValueError(f"{xname} must hold T={T} tasks (dim 0), got shape {tuple(x.shape)}")
    T, N = int(x.shape[0]), int(x.shape[1])
    if T == 0:
        raise ValueError(f"{xname} holds no tasks (T = 0)")
    if N == 0:
        raise ValueError(f"{xname} holds no points (N = 0)")
    if loss == "mse":
        _checks.float_dtype(yname, y, dtype)
        _checks.shape(yname, y, (T, N, dims[-1]))
    else:
        if y.dtype != torch.int64:
            raise TypeError(f"{yname} must be int64 class labels for loss='cross_entropy', got {y.dtype}")
        _checks.shape(yname, y, (T, N))
        if check_labels and labels_outside(y, dims[-1]):
            raise ValueError(f"{yname} holds labels outside [0, {dims[-1]}): min {int(y.min())}, max {int(y.max())}")
    _checks.contiguous(xname, x)
    _checks.contiguous(yname, y)
    return x, y, T, N


def mlp_loss_and_grad(
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    activation: str = "relu",
    loss: str = "mse",
    backend: str | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Per-task loss ``[T]`` and its gradient with respect to each task's own weights
    (``[T, out, in]`` each) and biases (``[T, out]``). See the module docstring."""
    check_activation_loss(activation, loss)
    ws, bs, dims, dtype, device = check_layers(weights, biases, per_task=True)
    eager = not torch.compiler.is_compiling()  # compiled: the label check runs inside the op
    x, y, T, N = check_data("x", x, "y", y, T=ws[0].shape[0], dims=dims, loss=loss, dtype=dtype, device=device,
                            check_labels=eager)
    be = backends.resolve(backend, device, "mlp_loss_and_grad")
    if be == "reference":
        return ref.mlp_loss_and_grad(ws, bs, x, y, activation=activation, loss=loss)
    if not eager:  # one opaque node for Dynamo (fastmaml::mlp_loss_and_grad)
        return lib.mlp_loss_and_grad_op([t.detach() for t in ws], [t.detach() for t in bs], x.detach(), y.detach(),
                                        activation, loss, be)
    return lib.launch_loss_and_grad(ws, bs, x, y, activation, loss, be)


def mlp_hvp(
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    v_weights: Sequence[torch.Tensor],
    v_biases: Sequence[torch.Tensor],
    *,
    activation: str = "relu",
    loss: str = "mse",
    backend: str | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-task Hessian-vector product ``H_t v_t`` of the per-task loss; ``v_weights`` /
    ``v_biases`` have the shapes of ``weights`` / ``biases``. Returns (hv_weights,
    hv_biases). The cpu/cuda kernels run the forward, the backward and the R-operator
    passes in one call (the loss and gradient are computed on the way, not returned)."""
    check_activation_loss(activation, loss)
    ws, bs, dims, dtype, device = check_layers(weights, biases, per_task=True)
    vw, vb, vdims, _, _ = check_layers(v_weights, v_biases, per_task=True, names=("v_weights", "v_biases"))
    if len(vw) != len(ws):
        raise ValueError(f"v_weights must hold {len(ws)} tensors like weights, got {len(vw)}")
    for l in range(len(ws)):
        _checks.float_dtype(f"v_weights[{l}]", vw[l], dtype)
        _checks.float_dtype(f"v_biases[{l}]", vb[l], dtype)
        _checks.same_device(f"v_weights[{l}]", vw[l], device)
        _checks.same_device(f"v_biases[{l}]", vb[l], device)
        _checks.shape(f"v_weights[{l}]", vw[l], ws[l].shape)
        _checks.shape(f"v_biases[{l}]", vb[l], bs[l].shape)
    eager = not torch.compiler.is_compiling()  # compiled: the label check runs inside the op
    x, y, T, N = check_data("x", x, "y", y, T=ws[0].shape[0], dims=dims, loss=loss, dtype=dtype, device=device,
                            check_labels=eager)
    be = backends.resolve(backend, device, "mlp_hvp")
    if be == "reference":
        return ref.mlp_hvp(ws, bs, x, y, vw, vb, activation=activation, loss=loss)
    if not eager:  # one opaque node for Dynamo (fastmaml::mlp_hvp)
        d = lambda ts: [t.detach() for t in ts]  # noqa: E731
        return lib.mlp_hvp_op(d(ws), d(bs), x.detach(), y.detach(), d(vw), d(vb), activation, loss, be)
    return lib.launch_hvp(ws, bs, x, y, vw, vb, activation, loss, be)


__all__ = ["mlp_loss_and_grad", "mlp_hvp"]
