"""Test configuration.

Without a CUDA device, Triton kernels run on CPU tensors through Triton's interpreter;
TRITON_INTERPRET must be set before triton.jit decorates any kernel, so it is set here,
before fastmaml's Triton modules are imported. Tests that need a GPU carry the ``cuda``
marker and are skipped cleanly without one; tests that run Triton kernels carry the
``triton`` marker (set explicitly: ``pytestmark`` in tests/triton/, ``helpers.TRITON``
for a triton backend parameter), which the GPU check selects with ``-m 'cuda or triton'``.

This folder is on sys.path (pytest inserts a rootdir conftest's folder), so every test
module imports the shared helpers as ``helpers`` and the per-op cases by module name;
test module basenames are unique across the folders.
"""

from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# the per-op case modules (sgd_step_cases, mlp_cases, ...) live in tests/ops/
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "ops"))


# Triton kernels run on GPU tensors where there is a GPU, else on CPU tensors through
# the interpreter: tests take their device from this fixture.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def triton_device() -> str:
    return TRITON_DEVICE


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
