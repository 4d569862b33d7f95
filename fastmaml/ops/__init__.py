"""The kernel layer: differentiable ops, each with a reference twin of the same
signature in :mod:`fastmaml.reference` and a ``backend=`` argument."""

from fastmaml.ops.sgd_step import sgd_step

__all__ = ["sgd_step"]
