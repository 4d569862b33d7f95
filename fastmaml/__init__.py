"""fastmaml: fused CPU/CUDA/Triton kernels for MAML.

Batched per-task inner loops and second-order meta-gradients by explicit, fused
Hessian-vector products. See README.md and docs/DESIGN.md.
"""

from fastmaml import backends, ops, reference
from fastmaml.maml import MAML, maml_loss

__version__ = "0.1.0"

__all__ = ["backends", "ops", "reference", "MAML", "maml_loss", "__version__"]
