"""The reference twins themselves (fastmaml.reference): gradcheck of the sgd_step twin, and
the batch_norm twin's closed-form levels against autograd of its own forward formula."""

from __future__ import annotations

import pytest
import torch
from batch_norm_cases import SHAPES, _first_and_second, _inputs, _native
from helpers import assert_close
from sgd_step_cases import LR_KINDS, THETA_MODES, lr_tensors, make_case

from fastmaml import reference as ref

@pytest.mark.parametrize("lr_kind", LR_KINDS)
@pytest.mark.parametrize("theta_mode", THETA_MODES)
def test_reference_gradcheck(lr_kind, theta_mode):
    params, grads, lr, _, _ = make_case(3, torch.float64, 2, lr_kind, theta_mode, n=3)
    P = [p.requires_grad_() for p in params]
    G = [g.requires_grad_() for g in grads]
    L = lr if isinstance(lr, float) else [a.requires_grad_() for a in lr_tensors(lr)]
    n = len(P)

    def f(*xs):
        lr_arg = lr if isinstance(lr, float) else (xs[2 * n] if isinstance(lr, torch.Tensor) else list(xs[2 * n :]))
        return tuple(ref.sgd_step(list(xs[:n]), list(xs[n : 2 * n]), lr_arg))

    assert torch.autograd.gradcheck(f, tuple(P + G + ([] if isinstance(lr, float) else L)))


# ---- every backend against the reference and the independent computation -------------



@pytest.mark.parametrize("shape", SHAPES)
def test_batch_norm_twin_levels_match_autograd(shape):
    """The closed-form backward and double backward of fastmaml.reference.batch_norm equal
    autograd of its forward formula (and the twin equals F.batch_norm)."""
    x, w, b = _inputs(shape, mean=3.0)
    for i, (a, e) in enumerate(zip(_first_and_second(ref.batch_norm, x, w, b), _first_and_second(_native, x, w, b))):
        assert_close(f"twin level {i}", a, e, rtol=1e-10, atol=1e-10)
    x3 = x.detach().reshape(x.shape[0], x.shape[1], -1).requires_grad_(True)
    y, mean, rstd = ref.batch_norm_forward(x3, w, b, 1e-5)
    g = torch.Generator().manual_seed(7)
    gy = torch.randn(y.shape, generator=g, dtype=y.dtype).requires_grad_(True)
    dx, dw, db = torch.autograd.grad(y, (x3, w, b), gy, create_graph=True)
    mine_dx, mine_dw, mine_db = ref.batch_norm_backward(gy, x3, w, mean.detach(), rstd.detach())
    assert_close("dx", mine_dx, dx, rtol=1e-10, atol=1e-12)
    assert_close("dw", mine_dw, dw, rtol=1e-10, atol=1e-12)
    assert_close("db", mine_db, db, rtol=1e-10, atol=1e-12)
    a = torch.randn(x3.shape, generator=g, dtype=x3.dtype)
    bw = torch.randn(w.shape, generator=g, dtype=w.dtype)
    bb = torch.randn(b.shape, generator=g, dtype=b.dtype)
    want = torch.autograd.grad((dx * a).sum() + (dw * bw).sum() + (db * bb).sum(), (gy, x3, w))
    got = ref.batch_norm_double_backward(a, bw, bb, gy, x3, w, mean.detach(), rstd.detach())
    for name, p, q in zip(("g_gy", "g_x", "g_w"), got, want):
        assert_close(name, p, q, rtol=1e-9, atol=1e-11)
