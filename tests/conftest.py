"""Test configuration.

Without a CUDA device, Triton kernels run on CPU tensors through Triton's interpreter;
TRITON_INTERPRET must be set before triton.jit decorates any kernel, so it is set here,
before fastmaml's Triton modules are imported. Tests that need a GPU carry the ``cuda``
marker and are skipped cleanly without one.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
