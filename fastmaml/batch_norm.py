"""The MAML layer's routing of ``F.batch_norm`` to the fused op
:func:`fastmaml.ops.batch_norm` (batch statistics, closed-form double backward).

The generic MAML path runs the model under :class:`FusedBatchNorm` (a
``TorchFunctionMode``) where the op applies: training mode without running statistics,
affine, float32/float64 on the CPU, outside torch.func transforms.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from fastmaml.ops import _batch_norm as op
from fastmaml.ops._batch_norm import available

_F_BATCH_NORM = torch.nn.functional.batch_norm


def _applies(x: Any, running_mean: Any, running_var: Any, weight: Any, bias: Any, training: bool,
             eps: Any) -> bool:
    """Whether the mode routes this ``F.batch_norm`` call: batch statistics (training, no
    running statistics), CPU, outside torch.func transforms, and arguments
    :func:`fastmaml.ops.batch_norm` accepts."""
    return (training and running_mean is None and running_var is None and isinstance(x, torch.Tensor)
            and x.device.type == "cpu" and not torch._C._are_functorch_transforms_active()
            and op.problem(x, weight, bias, eps) is None)


class FusedBatchNorm(TorchFunctionMode):
    """Within this mode, ``F.batch_norm`` calls that :func:`fastmaml.ops.batch_norm`
    covers (training mode, no running statistics, affine, float on the CPU, outside
    torch.func transforms) go to it; every other call is left to PyTorch."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is _F_BATCH_NORM:
            bound = _bind(*args, **kwargs)
            if bound is not None:
                return op.run_checked(*bound)  # _applies has checked the arguments
        return func(*args, **kwargs)


def _bind(input: Any, running_mean: Any, running_var: Any, weight: Any = None, bias: Any = None,  # noqa: A002
          training: bool = False, momentum: float = 0.1, eps: float = 1e-5) -> tuple | None:
    if _applies(input, running_mean, running_var, weight, bias, training, eps):
        return input, weight, bias, eps
    return None


__all__ = ["FusedBatchNorm", "available"]
