"""The Triton kernels of sgd_step (:mod:`fastmaml.triton.sgd_step`) really run: under
TRITON_INTERPRET=1 without a GPU, on the GPU otherwise."""

from __future__ import annotations

import importlib

import pytest
import torch

from fastmaml import backends
from fastmaml.ops import sgd_step

triton_module = importlib.import_module("fastmaml.triton.sgd_step")
pytestmark = pytest.mark.triton

def test_triton_kernels_really_run(monkeypatch):
    """Under TRITON_INTERPRET=1 (set by conftest without a GPU) the triton backend is
    available and its kernels execute: count the launches."""
    assert backends.status("triton").available, backends.status("triton").reason
    calls = []
    for name in ("_sgd_step_fwd_kernel", "_sgd_step_bwd_kernel", "_sum_partials_kernel"):
        kern = getattr(triton_module, name)

        class Spy:
            def __init__(self, k, nm):
                self.k, self.nm = k, nm

            def __getitem__(self, grid):
                calls.append(self.nm)
                return self.k[grid]

        monkeypatch.setattr(triton_module, name, Spy(kern, name))
    p = [torch.randn(5), torch.randn(3, 2)]
    g = [torch.randn(2, 5), torch.randn(2, 3, 2)]
    lr = torch.tensor(0.1, requires_grad=True)
    out = sgd_step(p, g, lr, backend="triton")
    torch.autograd.grad(out, [lr], [torch.ones_like(o) for o in out])
    assert calls == ["_sgd_step_fwd_kernel", "_sgd_step_bwd_kernel", "_sum_partials_kernel"]
