"""Pure-PyTorch reference twins of every fastmaml op: readable, no tricks, any device,
any float dtype. They define the numbers every other backend is tested against."""

from fastmaml.reference.sgd_step import sgd_step

__all__ = ["sgd_step"]
from fastmaml.reference.mlp import maml_mlp, mlp_hvp, mlp_loss_and_grad  # noqa: E402

__all__ += ["maml_mlp", "mlp_hvp", "mlp_loss_and_grad"]
