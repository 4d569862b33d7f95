"""Pure-PyTorch reference twins of every fastmaml op: readable, no tricks, any device,
any float dtype. They define the numbers every other backend is tested against."""

from fastmaml.reference.batch_norm import (
    batch_norm,
    batch_norm_backward,
    batch_norm_double_backward,
    batch_norm_forward,
)
from fastmaml.reference.maml import adapt as maml_adapt
from fastmaml.reference.maml import maml_loss
from fastmaml.reference.mlp import maml_mlp, mlp_hvp, mlp_loss_and_grad
from fastmaml.reference.sgd_step import sgd_step

__all__ = ["sgd_step", "maml_loss", "maml_adapt", "maml_mlp", "mlp_hvp", "mlp_loss_and_grad", "batch_norm",
           "batch_norm_forward", "batch_norm_backward", "batch_norm_double_backward"]
