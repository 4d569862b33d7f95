"""Strategies and comparisons shared by the property-based tests."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

DTYPES = st.sampled_from([torch.float32, torch.float64])

# Agreement with the reference: relative to the largest magnitude of the reference
# result (gradients and HVPs have small entries that carry only absolute error).
RTOL = {torch.float32: 2e-4, torch.float64: 1e-10}


def tol(dtype: torch.dtype, scale: float = 1.0) -> float:
    return RTOL[dtype] * scale


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != {want.dtype}"
    g, w = got.double(), want.double()
    assert torch.isfinite(g).all() == torch.isfinite(w).all(), f"{name}: finiteness differs"
    if g.numel() == 0:
        return
    err = float((g - w).abs().max())
    scale = float(w.abs().max()) + 1e-30
    assert err <= rtol * scale + rtol, f"{name}: max abs error {err:.3e} > {rtol:.1e} * (1 + {scale:.3e})"


def assert_all_close(name: str, got, want, rtol: float) -> None:
    got, want = list(got), list(want)
    assert len(got) == len(want), f"{name}: {len(got)} tensors != {len(want)}"
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close(f"{name}[{i}]", a, b, rtol)


def strided_copy(t: torch.Tensor, how: int) -> torch.Tensor:
    """The values of ``t`` in a non-contiguous layout (``how`` picks which): a slice of a
    larger tensor along the last dim, or a transposed storage; equal to ``t``."""
    if t.dim() == 0:
        return t
    if how == 0 or t.dim() == 1:
        big = torch.cat([t, torch.zeros_like(t)], dim=-1)
        v = big[..., : t.shape[-1]]
    else:
        v = t.transpose(0, -1).contiguous().transpose(0, -1)
    assert torch.equal(v, t)
    return v


def seeds() -> st.SearchStrategy[int]:
    return st.integers(0, 2**31 - 1)


def randn(gen: torch.Generator, *shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return (scale * torch.randn(tuple(shape), generator=gen, dtype=torch.float64)).to(dtype)
