"""Property: the fused batch-statistics BatchNorm equals ``F.batch_norm`` (training
mode, no running stats) in its forward, backward and double backward, for random
shapes, channel counts, eps and dtypes; strided inputs give the same result."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from fastmaml.ops import batch_norm
from prop_util import DTYPES, assert_all_close, assert_close, randn, seeds, strided_copy, tol


@given(seed=seeds(), N=st.integers(2, 5), C=st.integers(1, 4), spatial=st.lists(st.integers(1, 4), max_size=2),
       eps=st.sampled_from([1e-5, 1e-3]), dtype=DTYPES, strided=st.booleans())
def test_batch_norm_equals_torch_through_double_backward(seed, N, C, spatial, eps, dtype, strided):
    g = torch.Generator().manual_seed(seed)
    x0 = randn(g, N, C, *spatial, dtype=dtype)
    w0 = randn(g, C, dtype=dtype) + 1.0
    b0 = randn(g, C, dtype=dtype)
    gy = randn(g, N, C, *spatial, dtype=dtype)
    vx = randn(g, N, C, *spatial, dtype=dtype)
    res = {}
    for impl in ("torch", "fused"):
        x = (strided_copy(x0, 1) if strided and impl == "fused" else x0.clone()).requires_grad_(True)
        w = w0.clone().requires_grad_(True)
        b = b0.clone().requires_grad_(True)
        if impl == "torch":
            y = F.batch_norm(x, None, None, w, b, training=True, eps=eps)
        else:
            y = batch_norm(x, w, b, eps)
        gx, gw, gb = torch.autograd.grad((y * gy).sum(), (x, w, b), create_graph=True)
        hv = torch.autograd.grad((gx * vx).sum() + gw.sum() + gb.sum(), (x, w), allow_unused=True)
        res[impl] = (y.detach(), [gx.detach(), gw.detach(), gb.detach()],
                     [torch.zeros_like(t) if h is None else h for h, t in zip(hv, (x, w))])
    scale = 1e2 if dtype == torch.float32 else 1e3
    assert_close("forward", res["fused"][0], res["torch"][0], tol(dtype, 10))
    assert_all_close("backward", res["fused"][1], res["torch"][1], tol(dtype, scale))
    assert_all_close("double backward", res["fused"][2], res["torch"][2], tol(dtype, scale))
