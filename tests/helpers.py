"""Helpers shared by the tests (importable from every test folder: tests/conftest.py's
folder is on sys.path).

:func:`assert_close` is the one comparison of the suite: elementwise
``|got − want| <= atol + rtol · scale``, with ``scale`` either ``|want|`` per element
(``scale="element"``) or ``max |want|`` over the tensor (``scale="max"``: gradients and
HVPs whose small entries carry only absolute error). ``atol`` may be a tensor (a bound
per element). On failure it names the worst element (index, got, want, error, bound) and
how many are off.
"""

from __future__ import annotations

import pytest
import torch

# The triton backend as a pytest parameter that carries the ``triton`` marker (the GPU
# check selects ``-m 'cuda or triton'``); the cuda backend likewise with ``cuda``.
TRITON = pytest.param("triton", marks=pytest.mark.triton)
CUDA = pytest.param("cuda", marks=pytest.mark.cuda)


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor, *, atol: float | torch.Tensor = 0.0,
                 rtol: float = 0.0, scale: str = "element", dtype: torch.dtype | None = None) -> None:
    """Raise ``AssertionError`` unless ``|got − want| <= atol + rtol · scale`` everywhere
    (see the module docstring); ``dtype``: also require ``got.dtype == dtype``."""
    assert tuple(got.shape) == tuple(want.shape), f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if dtype is not None:
        assert got.dtype == dtype, f"{name}: dtype {got.dtype} != {dtype}"
    g64 = got.detach().double().cpu()
    w64 = want.detach().double().cpu()
    err = (g64 - w64).abs()
    if scale == "max":
        ref = torch.tensor(w64.abs().max().item() + 1e-30 if w64.numel() else 1e-30, dtype=torch.float64)
    elif scale == "element":
        ref = w64.abs()
    else:
        raise ValueError(f"scale must be 'element' or 'max', got {scale!r}")
    a = torch.as_tensor(atol, dtype=torch.float64).cpu()
    bound = (a + rtol * ref).expand_as(err) if err.dim() else a + rtol * ref
    bad = err > bound
    if not bool(bad.any()):
        return
    k = int(torch.argmax(err - bound).item()) if err.dim() else 0
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(k), err.shape)) if err.dim() else ()
    raise AssertionError(
        f"{name}: {int(bad.sum())} of {err.numel()} elements off; worst at {idx}: "
        f"got {g64.reshape(-1)[k].item():.17g}, want {w64.reshape(-1)[k].item():.17g}, "
        f"|err| {err.reshape(-1)[k].item():.3e} > bound {bound.reshape(-1)[k].item():.3e} "
        f"(atol {'per element' if a.dim() else f'{float(a):g}'}, rtol {rtol:g}, scale {scale})")
