"""The per-task model call of the generic path for a plain ``nn.Sequential``: its layers
called one after another as functions of the given parameters.

The generic path calls the model once per task and step, and again in the HVPs. Through
``torch.func.functional_call`` every call swaps the parameters on the module objects, and
the fused-BatchNorm ``TorchFunctionMode`` (:mod:`fastmaml.maml.batch_norm_mode`) runs
Python for every torch call made inside it; for a five-image Omniglot support set that
Python is about a third of a forward's time (benchmarks/RESULTS.md, "Direct per-layer
calls"). For a model built only of the layer types below, :func:`sequential_fn` gives the
same computation as a loop of functional calls reading each layer's settings, the
batch-statistics BatchNorm calls going straight to the fused BatchNorm when asked
(``run(params, x, fused_bn=True)``, under the same condition as the mode:
:func:`fastmaml.maml.batch_norm_mode._applies`), no mode and no parameter swap.

Taken only when it is the same computation as the module's own call: exact layer types
(a subclass may override ``forward``) ``nn.Sequential`` (nested too), ``nn.Conv2d``,
``nn.BatchNorm2d``, ``nn.ReLU``, ``nn.MaxPool2d``, ``nn.Flatten``, ``nn.Linear`` and
``nn.Identity``; no forward or backward hook on any module and no global module hook; no
parametrization; no BatchNorm that would update running statistics (training with
``track_running_stats``); and parameter names that are exactly the layers'
``weight``/``bias``. Anything else keeps ``functional_call``
(:func:`fastmaml.maml.tasks.module_fn`). A parameter missing from ``params`` (frozen) is
read from the module, as ``functional_call`` does. The function is stateless, so the task
workers call it concurrently.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module

from fastmaml.maml import batch_norm_mode
from fastmaml.ops import _batch_norm as _bn

_LAYERS = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.Flatten, nn.Linear, nn.Identity)


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def _global_hooks() -> bool:
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks
                or _module._global_backward_hooks or _module._global_backward_pre_hooks)


def _flatten(model: nn.Module, prefix: str, out: list) -> bool:
    """Appends (name, layer) of every leaf layer in call order; False if unsupported."""
    if type(model) is not nn.Sequential or _hooked(model) or model._parameters or model._buffers:
        return False
    for name, m in model._modules.items():
        if m is None:
            return False
        full = f"{prefix}{name}"
        if type(m) is nn.Sequential:
            if not _flatten(m, full + ".", out):
                return False
        elif type(m) in _LAYERS and not _hooked(m):
            out.append((full, m))
        else:
            return False
    return True


def _supported(layers: list) -> bool:
    for _, m in layers:
        if torch.nn.utils.parametrize.is_parametrized(m):
            return False
        if set(m._parameters) - {"weight", "bias"}:
            return False
        if isinstance(m, nn.BatchNorm2d) and m.training and m.track_running_stats:
            return False  # the module would count batches and update its running statistics
        if isinstance(m, nn.MaxPool2d) and m.return_indices:
            return False
    return True


class SequentialFn:
    """``fn(params, x)`` of a supported ``nn.Sequential`` (see the module docstring);
    ``run(params, x, fused_bn)`` with the BatchNorm routing of the fused-BatchNorm mode."""

    thread_safe = True

    def __init__(self, layers: list, channels_last_safe: bool) -> None:
        self.layers = layers
        self.channels_last_safe = channels_last_safe

    def __call__(self, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return self.run(params, x, False)

    def run(self, params: Mapping[str, torch.Tensor], x: torch.Tensor, fused_bn: bool) -> torch.Tensor:
        h = x
        get = params.get
        for name, m in self.layers:
            t = type(m)
            if t is nn.ReLU:
                h = F.relu(h, inplace=m.inplace)
                continue
            if t is nn.Flatten:
                h = h.flatten(m.start_dim, m.end_dim)
                continue
            if t is nn.Identity:
                continue
            if t is nn.MaxPool2d:
                h = F.max_pool2d(h, m.kernel_size, m.stride, m.padding, m.dilation, ceil_mode=m.ceil_mode)
                continue
            mp = m._parameters
            w = get(f"{name}.weight", mp.get("weight"))
            b = get(f"{name}.bias", mp.get("bias"))
            if t is nn.Conv2d:
                h = m._conv_forward(h, w, b)
            elif t is nn.Linear:
                h = F.linear(h, w, b)
            else:  # nn.BatchNorm2d, as its forward (no running-statistics update: see _supported)
                m._check_input_dim(h)
                rm = m.running_mean if not m.training else None
                rv = m.running_var if not m.training else None
                train = m.training or (m.running_mean is None and m.running_var is None)
                if fused_bn and batch_norm_mode._applies(h, rm, rv, w, b, train, m.eps):
                    h = _bn.run_checked(h, w, b, m.eps)
                else:
                    h = F.batch_norm(h, rm, rv, w, b, train, 0.0 if m.momentum is None else m.momentum, m.eps)
        return h


def call(fn: object, params: Mapping[str, torch.Tensor], x: torch.Tensor, fused_bn: bool) -> torch.Tensor:
    """``fn(params, x)`` with its batch-statistics BatchNorm calls on the fused BatchNorm
    when ``fused_bn``: a :class:`SequentialFn` routes them itself, any other ``fn`` runs
    inside the fused-BatchNorm mode."""
    if isinstance(fn, SequentialFn):
        return fn.run(params, x, fused_bn)
    if not fused_bn:
        return fn(params, x)  # type: ignore[operator]
    with batch_norm_mode.FusedBatchNorm():
        return fn(params, x)  # type: ignore[operator]


def sequential_fn(model: nn.Module, channels_last_safe: bool) -> SequentialFn | None:
    """The direct function of ``model``, or None when it is not the same computation as
    the module's own call (see the module docstring)."""
    layers: list = []
    if _global_hooks() or not _flatten(model, "", layers) or not layers or not _supported(layers):
        return None
    expected = {f"{n}.{p}" for n, m in layers for p, v in m._parameters.items() if v is not None}
    if {n for n, _ in model.named_parameters()} != expected:
        return None  # a parameter shared by two layers, or another name: functional_call's semantics
    return SequentialFn(layers, channels_last_safe)


__all__ = ["SequentialFn", "call", "sequential_fn"]
