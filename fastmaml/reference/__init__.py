"""Pure-PyTorch reference twins of every fastmaml op: readable, no tricks, any device,
any float dtype. They define the numbers every other backend is tested against."""

from fastmaml.reference.sgd_step import sgd_step
from fastmaml.reference.maml import adapt as maml_adapt
from fastmaml.reference.maml import maml_loss

__all__ = ["sgd_step", "maml_loss", "maml_adapt"]
