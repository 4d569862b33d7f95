"""The kernel layer: differentiable ops, each with a reference twin of the same
signature in :mod:`fastmaml.reference` and a ``backend=`` argument.

Every op has four faces (docs/DESIGN.md §3): kernels (``csrc/<op>/``,
:mod:`fastmaml.triton`) → launchers → a ``torch.autograd.Function`` → the public
function exported here. The modules are named so that no function shadows one:

- ``_sgd_step/`` (``checks``, ``launch``, ``function``): :func:`sgd_step`;
- ``mlp``: :func:`mlp_loss_and_grad`, :func:`mlp_hvp` (their launchers and custom ops:
  ``mlp_library``);
- ``_maml_mlp/`` (``config``, ``fused``, ``layerwise``, ``function``): :func:`maml_mlp`;
- ``maml_mlp_fit``: whether an MLP fits the fused ``maml_mlp`` kernel
  (``fused_workspace_bytes``, ``fused_limits``, ``fits_fused``); which *models* take
  it is the MAML layer's question (:mod:`fastmaml.maml.mlp_path`);
- ``_batch_norm``: :func:`batch_norm` (batch statistics, closed-form double backward; its
  launchers and the three custom ops: ``batch_norm_library``).

Every kernel entry is also a ``torch.library`` custom op, ``torch.ops.fastmaml.*``,
registered by importing this package (docs/DESIGN.md §7).
"""

from fastmaml.ops._batch_norm import batch_norm
from fastmaml.ops._maml_mlp.function import maml_mlp
from fastmaml.ops._sgd_step.function import sgd_step
from fastmaml.ops.mlp import mlp_hvp, mlp_loss_and_grad

__all__ = ["sgd_step", "mlp_loss_and_grad", "mlp_hvp", "maml_mlp", "batch_norm"]
