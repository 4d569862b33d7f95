"""Routing a model's batch-statistics ``F.batch_norm`` calls to fastmaml's fused
BatchNorm (:func:`fastmaml.ops.batch_norm`: C++ kernels for its forward, backward and
a closed-form double backward) by a ``TorchFunctionMode``.

The generic MAML path enters :class:`FusedBatchNorm` around each per-task call of the
model in the CPU per-task loop (``fused_batch_norm=True``, the default): PyTorch's
``batchnorm_double_backward`` is a composite of ~40 full-size ops and dominated a
miniImageNet task's Hessian-vector product. Any model calling ``F.batch_norm``
(``nn.BatchNorm*d`` with ``track_running_stats=False``) gets it; calls the fused
function does not cover are left to PyTorch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from fastmaml.ops import _batch_norm as _bn  # its argument check and the checked call (looked up per call)

_F_BATCH_NORM = torch.nn.functional.batch_norm


def _applies(x: Any, running_mean: Any, running_var: Any, weight: Any, bias: Any, training: bool,
             eps: Any) -> bool:
    """Whether the mode routes this ``F.batch_norm`` call: batch statistics (training, no
    running statistics), CPU, outside torch.func transforms, and arguments the fused
    ``batch_norm`` accepts."""
    return (training and running_mean is None and running_var is None and isinstance(x, torch.Tensor)
            and x.device.type == "cpu" and not torch._C._are_functorch_transforms_active()
            and _bn.problem(x, weight, bias, eps) is None)


def _bind(input: Any, running_mean: Any, running_var: Any, weight: Any = None, bias: Any = None,  # noqa: A002
          training: bool = False, momentum: float = 0.1, eps: float = 1e-5) -> tuple | None:
    if _applies(input, running_mean, running_var, weight, bias, training, eps):
        return input, weight, bias, eps
    return None


class FusedBatchNorm(TorchFunctionMode):
    """Within this mode, ``F.batch_norm`` calls that the fused ``batch_norm`` covers
    (training mode, no running statistics, affine, float on the CPU, outside torch.func
    transforms) go to it; every other call is left to PyTorch."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is _F_BATCH_NORM:
            bound = _bind(*args, **kwargs)
            if bound is not None:
                return _bn.run_checked(*bound)  # _applies has checked the arguments
        return func(*args, **kwargs)
