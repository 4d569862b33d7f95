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


# Triton kernels run on GPU tensors where there is a GPU, else on CPU tensors through
# the interpreter: tests take their device from this fixture.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def triton_device() -> str:
    return TRITON_DEVICE


def pytest_collection_modifyitems(config, items):
    # Every test with "triton" in its id is selectable with `-m triton` (the GPU check runs them).
    for item in items:
        if "triton" in item.nodeid.lower():
            item.add_marker(pytest.mark.triton)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
