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
    # `-m triton` (the GPU check) selects the Triton tests that run on the GPU where there
    # is one: those taking their device from `triton_device`, and cuda-marked ones. The
    # other tests with "triton" in their id run Triton on CPU tensors: they need the
    # interpreter, which is on only without a GPU (or with TRITON_INTERPRET=1 set by hand);
    # where it is off they are skipped with the reason, never selected by `-m triton`.
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    cpu_only = pytest.mark.skip(reason="runs Triton kernels on CPU tensors: needs TRITON_INTERPRET=1 "
                                       "(set by this conftest only without a GPU)")
    for item in items:
        if "triton" not in item.nodeid.lower():
            continue
        if "triton_device" in getattr(item, "fixturenames", ()) or "cuda" in item.keywords:
            item.add_marker(pytest.mark.triton)
        elif not interpreted:
            item.add_marker(cpu_only)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
