"""The rest of the MAML family on fastmaml's kernels: implicit MAML (conjugate gradient
on the fused HVPs, all tasks in lockstep) and Reptile (batched inner loops with the
fused ``sgd_step``). See docs/DESIGN.md §9."""

from fastmaml.family.cg import CGInfo, batched_cg
from fastmaml.family.imaml import iMAML, imaml_adapt, imaml_loss
from fastmaml.family.reptile import Reptile, reptile_direction

__all__ = ["iMAML", "imaml_loss", "imaml_adapt", "Reptile", "reptile_direction", "batched_cg", "CGInfo"]
