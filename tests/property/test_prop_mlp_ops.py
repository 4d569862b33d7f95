"""Property: the MLP ops (``mlp_loss_and_grad``, ``mlp_hvp``, ``maml_mlp``) on the cpu
backend equal the reference twin for random task counts, point counts, widths, depths,
activations, losses, dtypes, lr granularities, first/second order and MSL weights;
strided inputs are either taken (same result) or refused with "must be contiguous"."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fastmaml import ops
from fastmaml.ops import maml_mlp_fit
from prop_util import DTYPES, assert_all_close, assert_close, randn, seeds, strided_copy, tol

WIDTHS = st.lists(st.integers(1, 9), min_size=2, max_size=4)
ACTS = st.sampled_from(["relu", "tanh"])
LOSSES = st.sampled_from(["mse", "cross_entropy"])


def _layers(g, dims, T, dtype):
    ws = [randn(g, *(() if T is None else (T,)), dims[i + 1], dims[i], dtype=dtype, scale=dims[i] ** -0.5)
          for i in range(len(dims) - 1)]
    bs = [randn(g, *(() if T is None else (T,)), dims[i + 1], dtype=dtype, scale=0.1) for i in range(len(dims) - 1)]
    return ws, bs


def _data(g, T, N, dims, loss, dtype):
    x = randn(g, T, N, dims[0], dtype=dtype)
    if loss == "mse":
        y = randn(g, T, N, dims[-1], dtype=dtype)
    else:
        y = torch.randint(0, dims[-1], (T, N), generator=g)
    return x, y


@given(seed=seeds(), T=st.integers(1, 4), N=st.integers(1, 6), dims=WIDTHS, act=ACTS, loss=LOSSES, dtype=DTYPES)
def test_mlp_loss_grad_and_hvp_cpu_equal_reference(seed, T, N, dims, act, loss, dtype):
    g = torch.Generator().manual_seed(seed)
    ws, bs = _layers(g, dims, T, dtype)
    x, y = _data(g, T, N, dims, loss, dtype)
    vw, vb = _layers(g, dims, T, dtype)
    kw = dict(activation=act, loss=loss)
    got = ops.mlp_loss_and_grad(ws, bs, x, y, backend="cpu", **kw)
    want = ops.mlp_loss_and_grad(ws, bs, x, y, backend="reference", **kw)
    assert_close("loss", got[0], want[0], tol(dtype))
    assert_all_close("grad W", got[1], want[1], tol(dtype, 10))
    assert_all_close("grad b", got[2], want[2], tol(dtype, 10))
    got_h = ops.mlp_hvp(ws, bs, x, y, vw, vb, backend="cpu", **kw)
    want_h = ops.mlp_hvp(ws, bs, x, y, vw, vb, backend="reference", **kw)
    assert_all_close("hvp W", got_h[0], want_h[0], tol(dtype, 100))
    assert_all_close("hvp b", got_h[1], want_h[1], tol(dtype, 100))


@given(seed=seeds(), dims=WIDTHS, which=st.sampled_from(["x", "w0"]), how=st.integers(0, 1))
def test_mlp_ops_strided_inputs_equal_or_refused(seed, dims, which, how):
    g = torch.Generator().manual_seed(seed)
    ws, bs = _layers(g, dims, 2, torch.float64)
    x, y = _data(g, 2, 3, dims, "mse", torch.float64)
    want = ops.mlp_loss_and_grad(ws, bs, x, y, backend="cpu")
    if which == "x":
        x = strided_copy(x, how)
    else:
        ws = [strided_copy(ws[0], how), *ws[1:]]
    if x.is_contiguous() and ws[0].is_contiguous():
        return
    try:
        got = ops.mlp_loss_and_grad(ws, bs, x, y, backend="cpu")
    except ValueError as e:
        assert "must be contiguous" in str(e)
        return
    assert torch.equal(got[0], want[0])


def _lr(g, kind, K, shapes, dtype, learned):
    def r(*s):
        t = (0.05 + 0.1 * torch.rand(s, generator=g, dtype=torch.float64)).to(dtype)
        return t.requires_grad_(learned)

    if kind == "float":
        return 0.07
    if kind == "scalar":
        return r()
    if kind == "table":
        return r(K, len(shapes))
    if kind == "elem":
        return [r(*s) for s in shapes]
    return [r(K, *s) for s in shapes]


def _lr_tensors(lr):
    return [lr] if isinstance(lr, torch.Tensor) else (lr if isinstance(lr, list) else [])


_MAML_MLP_MODULE = maml_mlp_fit  # the fused limit, read at each call


@pytest.mark.parametrize("impl", ["fused", "layerwise"])
@given(seed=seeds(), T=st.integers(1, 3), Ns=st.integers(1, 5), Nq=st.integers(1, 5), K=st.integers(1, 3),
       dims=WIDTHS, act=ACTS, loss=LOSSES, dtype=DTYPES, first_order=st.booleans(),
       lr_kind=st.sampled_from(["float", "scalar", "table", "elem", "step_elem"]), learned=st.booleans(),
       msl=st.booleans())
def test_maml_mlp_cpu_equals_reference(impl, seed, T, Ns, Nq, K, dims, act, loss, dtype, first_order, lr_kind,
                                       learned, msl):
    g = torch.Generator().manual_seed(seed)
    ws, bs = _layers(g, dims, None, dtype)
    xs, ys = _data(g, T, Ns, dims, loss, dtype)
    xq, yq = _data(g, T, Nq, dims, loss, dtype)
    shapes = [p.shape for pair in zip(ws, bs) for p in pair]
    lr = _lr(g, lr_kind, K, shapes, dtype, learned)
    w = torch.rand(K, generator=g, dtype=torch.float64).to(dtype) if msl else None
    out = {}
    limit = _MAML_MLP_MODULE.FUSED_CPU_MAX_WORKSPACE_BYTES
    for backend in ("reference", "cpu"):
        leaves = [p.clone().requires_grad_(True) for p in (*ws, *bs)]
        lrs = lr if lr_kind == "float" else (
            lr.detach().clone().requires_grad_(learned) if isinstance(lr, torch.Tensor)
            else [t.detach().clone().requires_grad_(learned) for t in lr])
        if backend == "cpu" and impl == "layerwise":
            _MAML_MLP_MODULE.FUSED_CPU_MAX_WORKSPACE_BYTES = 0  # every model past the fused limit
        try:
            m = ops.maml_mlp(leaves[:len(ws)], leaves[len(ws):], xs, ys, xq, yq, lrs, steps=K,
                             first_order=first_order, activation=act, loss=loss, msl_weights=w, backend=backend)
        finally:
            _MAML_MLP_MODULE.FUSED_CPU_MAX_WORKSPACE_BYTES = limit
        m.backward()
        out[backend] = (m.detach(), [p.grad for p in leaves], [t.grad for t in _lr_tensors(lrs) if learned])
    assert_close("meta-loss", out["cpu"][0], out["reference"][0], tol(dtype, 10))
    assert_all_close("meta-grad", out["cpu"][1], out["reference"][1], tol(dtype, 100))
    assert_all_close("lr grad", out["cpu"][2], out["reference"][2], tol(dtype, 100))
