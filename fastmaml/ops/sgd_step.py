"""``sgd_step``: the fused multi-tensor, multi-task inner update θ' = θ − α ⊙ g.

(Skeleton: validates and runs the reference; the compiled and Triton backends are
added by the foundation work.)"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastmaml import backends
from fastmaml import reference as ref
from fastmaml.reference.sgd_step import LR


def sgd_step(
    params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], lr: LR, *, backend: str | None = None
) -> list[torch.Tensor]:
    """θ'_i = θ_i − α_i ⊙ g_i; see :func:`fastmaml.reference.sgd_step` for shapes."""
    device = grads[0].device
    backends.resolve(backend, device, "sgd_step")
    return ref.sgd_step(params, grads, lr)
