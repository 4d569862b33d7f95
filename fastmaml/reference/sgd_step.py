"""Reference inner update θ' = θ − α ⊙ g, one tensor at a time."""

from __future__ import annotations

from collections.abc import Sequence

import torch

LR = float | torch.Tensor | Sequence[torch.Tensor]


def sgd_step(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], lr: LR) -> list[torch.Tensor]:
    """θ'_i = θ_i − α_i ⊙ g_i for every tensor i (the ground truth of ``sgd_step``).

    params[i]: ``[*shape_i]`` (shared by the T tasks) or ``[T, *shape_i]`` (per task);
        which one is read off the shapes: ``params[i].shape == grads[i].shape[1:]``
        means shared, ``== grads[i].shape`` means per task.
    grads[i]:  ``[T, *shape_i]``, the same T for every i.
    lr: a Python float (one fixed rate) or 0-d tensor (one rate, learnable); a 1-d
        tensor ``[len(params)]`` (one rate per tensor, a row of MAML++'s
        ``[K, n_tensors]`` table); or a sequence of tensors, ``lr[i]`` of shape
        ``[*shape_i]`` (per element, Meta-SGD).
    Returns new ``[T, *shape_i]`` tensors (inputs are not modified), in the inputs'
    dtype (any float dtype, PyTorch's type promotion). Differentiable by autograd in
    every tensor argument: dθ_i = Σ_t v_i (shared) or v_i (per task), dg_i = −α_i ⊙ v_i,
    dα = −Σ g ⊙ v reduced to α's granularity. No input checks beyond PyTorch's own:
    :func:`fastmaml.ops.sgd_step` validates, then calls this for ``backend="reference"``.
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
