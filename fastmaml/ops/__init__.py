"""The kernel layer: differentiable ops, each with a reference twin of the same
signature in :mod:`fastmaml.reference` and a ``backend=`` argument."""

from fastmaml.ops.sgd_step import sgd_step

__all__ = ["sgd_step"]
from fastmaml.ops.mlp import mlp_hvp, mlp_loss_and_grad  # noqa: E402
from fastmaml.ops.maml_mlp import maml_mlp  # noqa: E402

__all__ += ["mlp_loss_and_grad", "mlp_hvp", "maml_mlp"]
