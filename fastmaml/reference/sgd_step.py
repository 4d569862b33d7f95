"""Reference inner update θ' = θ − α ⊙ g, one tensor at a time."""

from __future__ import annotations

from collections.abc import Sequence

import torch

LR = float | torch.Tensor | Sequence[torch.Tensor]


def sgd_step(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], lr: LR) -> list[torch.Tensor]:
    """θ'_i = θ_i − α_i ⊙ g_i for every tensor i.

    params[i]: ``[*shape_i]`` (shared by the tasks) or ``[T, *shape_i]`` (per task)
    grads[i]:  ``[T, *shape_i]``
    lr: a float or 0-d tensor (one rate); a 1-d tensor ``[len(params)]`` (one rate per
        tensor, a row of MAML++'s ``[K, n_tensors]`` table); or a sequence of tensors,
        ``lr[i]`` of shape ``[*shape_i]`` (per element, Meta-SGD).
    Returns ``[T, *shape_i]`` tensors. Differentiable by autograd in every argument.
    """
    out = []
    for i, (p, g) in enumerate(zip(params, grads)):
        if isinstance(lr, torch.Tensor):
            a = lr if lr.dim() == 0 else lr[i]
        elif isinstance(lr, (int, float)):
            a = lr
        else:
            a = lr[i]
        out.append(p - a * g)  # broadcasting: a shared θ ([*shape]) against g ([T, *shape])
    return out
