"""The MAML layer: the ``MAML`` module (:mod:`.module`), the functional API
(:mod:`.functional`), the one router (:mod:`.dispatch`), the fused-MLP path
(:mod:`.mlp_path`), the task mapping (:mod:`.tasks`), the generic adjoint meta-step
(:mod:`.adjoint`, :mod:`.plan`), the derivative flavours (:mod:`.hvp`), the checked
problem (:mod:`.problem`) and the fused-BatchNorm mode (:mod:`.batch_norm_mode`).

The public names are loaded on first use, so that importing one child (the reference
twin reads :mod:`.problem`) does not pull in the whole layer.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"MAML": "module", "maml_loss": "functional", "adapt": "functional", "predict": "functional"}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"fastmaml.maml.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'fastmaml.maml' has no attribute {name!r}")
