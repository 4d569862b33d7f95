"""fastmaml.maml.mlp_path: which models the fused MLP kernels take (``supports``) and why
not; the routing over them is tested in tests/maml/test_dispatch.py."""

from __future__ import annotations

import torch

from fastmaml.maml.mlp_path import supports
from fastmaml.ops import maml_mlp_fit as FIT


def test_supports():
    seq = torch.nn.Sequential(torch.nn.Linear(1, 40), torch.nn.ReLU(), torch.nn.Linear(40, 40), torch.nn.ReLU(),
                              torch.nn.Linear(40, 1))
    assert supports(seq)[0]
    assert supports(seq, "relu", "mse")[0]
    ok, why = supports(seq, "tanh")
    assert not ok and "does not match" in why
    ok, why = supports(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.GELU(), torch.nn.Linear(4, 1)))
    assert not ok and "GELU" in why
    ok, why = supports(torch.nn.Sequential(torch.nn.Linear(3, 4, bias=False)))
    assert not ok and "without bias" in why
    ok, why = supports(torch.nn.Conv2d(1, 1, 3))
    assert not ok and "Conv2d" in why
    ok, why = supports([2] * 10)
    assert not ok and "9 layers" in why
    assert FIT.fused_limits("cpu")["max_workspace_bytes"] == FIT.FUSED_CPU_MAX_WORKSPACE_BYTES
