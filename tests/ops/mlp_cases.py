"""Cases shared by the tests of the per-task MLP ops (mlp_loss_and_grad, mlp_hvp)."""

from __future__ import annotations

import torch
from helpers import assert_close

TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (2e-4, 1e-5)}  # (rtol, atol) relative to the max


def close(name, got, want, dtype):
    """:func:`helpers.assert_close` with this op's tolerance, relative to the largest magnitude."""
    rtol, atol = TOL[dtype]
    assert_close(name, got, want, rtol=rtol, atol=atol, scale="max")


def make_mlp(dims, T, N, loss, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    L = len(dims) - 1
    ws = [(torch.randn(T, dims[l + 1], dims[l], generator=g, dtype=dtype) / dims[l] ** 0.5).to(device) for l in range(L)]
    bs = [(0.1 * torch.randn(T, dims[l + 1], generator=g, dtype=dtype)).to(device) for l in range(L)]
    x = torch.randn(T, N, dims[0], generator=g, dtype=dtype).to(device)
    if loss == "mse":
        y = torch.randn(T, N, dims[-1], generator=g, dtype=dtype).to(device)
    else:
        y = torch.randint(0, dims[-1], (T, N), generator=g).to(device)
    return ws, bs, x, y


DIMS = [[1, 40, 40, 1], [3, 17, 9, 5], [13, 8, 24, 33, 4], [6, 3]]
