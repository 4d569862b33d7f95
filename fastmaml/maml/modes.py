"""The autocast and inference-mode policy of the MAML layer (docs/DESIGN.md §7).

- **Autocast**: the meta-step ignores an enclosing ``torch.autocast`` region (CPU or
  CUDA): it runs in the parameters' dtype (float32 stays float32) and returns it, on
  every path, backend and ``task_threads`` setting alike (the kernels are float32 /
  float64 only; a half-precision inner loop would also change MAML's second-order
  terms). Cast the model yourself for low-precision meta-learning.
- **Inference mode**: ``adapt``, ``predict`` and a forward without backward work under
  ``torch.inference_mode()``: the inner loop needs gradients, which inference mode
  forbids, so the call leaves it (``inference_mode(False)`` + ``no_grad``), reads
  inference-tensor inputs through a copy, and returns ordinary tensors that need no
  grad.
- **torch.func**: ``grad``/``vjp``/``vmap`` over ``maml_loss`` or ``MAML.forward`` on a
  fast backend raise one RuntimeError naming the alternative (:func:`check_no_transform`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def _autocast_on() -> bool:
    return torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")


def _plain(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.clone() if x.is_inference() else x
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return x


TRANSFORM_MESSAGE = (
    "{where} under a torch.func transform (grad, vjp, jacrev, vmap) is not supported on the fast paths: their "
    "meta-gradient is the fused kernels' (or the generic path's) once-differentiable adjoint, computed on real "
    "tensors. Use ordinary autograd instead: {where}(...).backward() or torch.autograd.grad({where}(...), params); "
    "to run several meta-batches at once, concatenate them along the task dimension T (or loop); backend="
    "'reference' is plain torch code")


def check_no_transform(where: str, backend: object) -> None:
    """RuntimeError naming what is unsupported and the alternative, when a torch.func
    transform is active around ``where`` on a fast backend (docs/DESIGN.md §7)."""
    if backend != "reference" and torch._C._are_functorch_transforms_active():
        raise RuntimeError(TRANSFORM_MESSAGE.format(where=where))


def call(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` under the policy above (a direct call when neither mode is on)."""
    if torch.compiler.is_compiling():  # Dynamo cannot trace the inference-mode query; autocast it can
        if not _autocast_on():
            return fn(*args)
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return fn(*args)
    inference = torch.is_inference_mode_enabled()
    if not inference and not _autocast_on():
        return fn(*args)
    if inference:
        with torch.inference_mode(False), torch.no_grad(), torch.autocast("cpu", enabled=False), \
                torch.autocast("cuda", enabled=False):
            return fn(*[_plain(a) for a in args])
    with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
        return fn(*args)


__all__ = ["call", "check_no_transform", "TRANSFORM_MESSAGE"]
