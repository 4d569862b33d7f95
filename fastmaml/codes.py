"""Every code and mode that crosses the Python/C++ boundary, defined once.

The C++ twin is ``csrc/common/codes.h``; the extension exports its values as
``fastmaml._C.codes()`` and this module checks at import (when the extension is built)
that both sides agree, so a number can never mean one thing in Python and another in
a kernel.

Distinct concepts have distinct names:

- ``DTYPE``, ``ACTIVATION``, ``LOSS``: the scalar type, the MLP activation and loss.
- ``SGD_LR_*``: the learning-rate *granularity* of ``sgd_step`` (how α was given; a
  Python-side notion, never sent to a kernel).
- ``SGD_KERNEL_LR_*``: how the ``sgd_step`` kernels *read* α (csrc/sgd_step/sgd_step.h);
  ``SGD_KERNEL_LR_MODE[granularity]`` maps one to the other.
- ``MLP_LR_*``: the packed learning-rate layout of the fused ``maml_mlp`` kernel
  (csrc/mlp/layout.h).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastmaml import _ext

DTYPE = {torch.float32: 0, torch.float64: 1}
ACTIVATION = {"relu": 0, "tanh": 1}
LOSS = {"mse": 0, "cross_entropy": 1}
MLP_MAX_LAYERS = 8

# sgd_step: how α was given (docs/DESIGN.md §1): a Python float, a 0-d tensor, one
# rate per tensor ([n]), or one tensor per parameter tensor (per element).
SGD_LR_FLOAT, SGD_LR_SCALAR, SGD_LR_PER_TENSOR, SGD_LR_PER_ELEMENT = 0, 1, 2, 3

# sgd_step kernels: an immediate value, a pointer to one value, a pointer to N_i values.
SGD_KERNEL_LR_VALUE, SGD_KERNEL_LR_BROADCAST, SGD_KERNEL_LR_ELEMENT = 0, 1, 2
SGD_KERNEL_LR_MODE = (SGD_KERNEL_LR_VALUE, SGD_KERNEL_LR_BROADCAST, SGD_KERNEL_LR_BROADCAST, SGD_KERNEL_LR_ELEMENT)

# maml_mlp fused kernel: the packed lr buffer is [1] (scalar), [K, 2L] (table),
# [P] (per element, flat order W_1, b_1, ...) or [K, P] (per step and element).
MLP_LR_SCALAR, MLP_LR_TABLE, MLP_LR_ELEMENT, MLP_LR_STEP_ELEMENT = 0, 1, 2, 3


def sgd_lr_pointers(lr_granularity: int, n: int, lrs: Sequence[torch.Tensor]) -> list[int]:
    """The α address of each of the ``n`` tensors of an ``sgd_step`` call, as its
    kernels (C++ and Triton) read them: none for a float, one value shared by all
    tensors, element i of a per-tensor ``[n]`` vector, or one tensor per tensor."""
    if lr_granularity == SGD_LR_FLOAT:
        return []
    if lr_granularity == SGD_LR_SCALAR:
        return [lrs[0].data_ptr()] * n
    if lr_granularity == SGD_LR_PER_TENSOR:
        base, es = lrs[0].data_ptr(), lrs[0].element_size()
        return [base + i * es for i in range(n)]
    return [a.data_ptr() for a in lrs]


def as_dict() -> dict[str, int]:
    """This module's values under the names the C++ side exports them by."""
    return {
        "dtype_float32": DTYPE[torch.float32],
        "dtype_float64": DTYPE[torch.float64],
        "act_relu": ACTIVATION["relu"],
        "act_tanh": ACTIVATION["tanh"],
        "loss_mse": LOSS["mse"],
        "loss_cross_entropy": LOSS["cross_entropy"],
        "mlp_max_layers": MLP_MAX_LAYERS,
        "sgd_kernel_lr_value": SGD_KERNEL_LR_VALUE,
        "sgd_kernel_lr_broadcast": SGD_KERNEL_LR_BROADCAST,
        "sgd_kernel_lr_element": SGD_KERNEL_LR_ELEMENT,
        "mlp_lr_scalar": MLP_LR_SCALAR,
        "mlp_lr_table": MLP_LR_TABLE,
        "mlp_lr_element": MLP_LR_ELEMENT,
        "mlp_lr_step_element": MLP_LR_STEP_ELEMENT,
    }


def check_agrees(c_codes: dict[str, int]) -> None:
    """Raise ``ImportError`` naming every code on which ``c_codes`` (the extension's
    ``codes()``) and this module disagree."""
    mine = as_dict()
    bad = [f"{k}: Python {mine.get(k)}, C++ {c_codes.get(k)}" for k in sorted(set(mine) | set(c_codes))
           if mine.get(k) != c_codes.get(k)]
    if bad:
        raise ImportError("fastmaml.codes and fastmaml._C.codes() disagree (rebuild the extension): " + "; ".join(bad))


if _ext._C is not None:
    if not hasattr(_ext._C, "codes"):
        raise ImportError("fastmaml._C has no codes(): it is older than this source tree; rebuild the extension "
                          "(python setup.py build_ext --inplace)")
    check_agrees(dict(_ext._C.codes()))
