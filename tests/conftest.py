"""Test configuration.

Without a CUDA device, Triton kernels run on CPU tensors through Triton's interpreter;
TRITON_INTERPRET must be set before triton.jit decorates any kernel, so it is set here,
before fastmaml's Triton modules are imported. Tests that need a GPU carry the ``cuda``
marker and are skipped cleanly without one; tests that run Triton kernels carry the
``triton`` marker (set explicitly: ``pytestmark`` in tests/triton/, ``tests.helpers.TRITON``
for a triton backend parameter, ``@pytest.mark.triton`` elsewhere), which the GPU check
selects with ``-m 'cuda or triton'``.

``tests/`` is a package whose folders mirror ``fastmaml/`` (docs/ARCHITECTURE.md): every
test module imports what it shares by its full name, ``from tests.helpers import
assert_close``, ``from tests.ops.sgd_step_cases import make_case``; pytest puts the
repository root (the folder above the outermost ``__init__.py``) on sys.path.
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
    # A triton-marked test that takes neither the `triton_device` fixture nor the cuda
    # marker runs Triton on CPU tensors: it needs the interpreter, which is on only without
    # a GPU (or with TRITON_INTERPRET=1 set by hand). Where it is off (the GPU check's
    # `-m 'cuda or triton'`) such a test is skipped with the reason instead of failing with
    # "backend 'triton' cannot run on cpu tensors".
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        cpu_only = pytest.mark.skip(reason="runs Triton kernels on CPU tensors: needs TRITON_INTERPRET=1 "
                                           "(set by this conftest only without a GPU)")
        for item in items:
            if ("triton" in item.keywords and "triton_device" not in getattr(item, "fixturenames", ())
                    and "cuda" not in item.keywords):
                item.add_marker(cpu_only)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
