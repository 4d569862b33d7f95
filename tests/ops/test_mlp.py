"""fastmaml.ops.mlp_loss_and_grad / mlp_hvp: beyond the op-vs-twin agreement (the
registry, tests/ops/test_registry.py), the HVP against torch.func.jvp(grad) and
torch.autograd.functional.hvp, reproducibility, the triton backend, bad inputs."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from mlp_cases import close, make_mlp

import fastmaml
from fastmaml import backends
from fastmaml import reference as ref
from fastmaml.ops import mlp_hvp, mlp_loss_and_grad
from fastmaml.reference.mlp import mlp_loss


@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_hvp_against_forward_over_reverse_and_functional_hvp(activation, loss):
    dtype = torch.float64
    dims = [4, 9, 7, 3]
    ws, bs, x, y = make_mlp(dims, 2, 6, loss, dtype, seed=3)
    g = torch.Generator().manual_seed(4)
    vw = [torch.randn(w.shape, generator=g, dtype=dtype) for w in ws]
    vb = [torch.randn(b.shape, generator=g, dtype=dtype) for b in bs]
    hw, hb = mlp_hvp(ws, bs, x, y, vw, vb, activation=activation, loss=loss, backend="cpu")
    L = len(ws)
    for t in range(2):
        params = tuple(p[t:t + 1].clone() for p in (*ws, *bs))
        tang = tuple(p[t:t + 1] for p in (*vw, *vb))

        def f(*ps):
            return mlp_loss(list(ps[:L]), list(ps[L:]), x[t:t + 1], y[t:t + 1], activation=activation, loss=loss).sum()

        _, jv = torch.func.jvp(lambda *ps: torch.func.grad(f, argnums=tuple(range(2 * L)))(*ps), params, tang)
        _, fh = torch.autograd.functional.hvp(f, params, tang)
        mine = [p[t:t + 1] for p in (*hw, *hb)]
        for i in range(2 * L):
            close(f"task {t} param {i} vs jvp(grad)", mine[i], jv[i], dtype)
            close(f"task {t} param {i} vs functional.hvp", mine[i], fh[i], dtype)


def test_cpu_loss_and_grad_bitwise_reproducible():
    ws, bs, x, y = make_mlp([5, 33, 17, 2], 9, 13, "mse", torch.float32)
    a = mlp_loss_and_grad(ws, bs, x, y, backend="cpu")
    b = mlp_loss_and_grad(ws, bs, x, y, backend="cpu")
    for p, q in zip([a[0], *a[1], *a[2]], [b[0], *b[1], *b[2]]):
        assert torch.equal(p, q)


@pytest.mark.triton
def test_triton_backend_runs_or_says_why():
    if not backends.status("triton").available:
        pytest.skip("triton backend unavailable: " + backends.status("triton").reason)
    ws, bs, x, y = make_mlp([3, 8, 4], 2, 5, "mse", torch.float32)
    if importlib.util.find_spec("fastmaml.triton.mlp") is None:
        with pytest.raises(RuntimeError, match="triton backend of the MLP ops is not available"):
            mlp_loss_and_grad(ws, bs, x, y, backend="triton")
        return
    lt, gw, gb = mlp_loss_and_grad(ws, bs, x, y, backend="triton")
    rl, rw, rb = ref.mlp_loss_and_grad(ws, bs, x, y)
    close("triton loss", lt, rl, torch.float32)
    for l in range(2):
        close(f"triton grad_w[{l}]", gw[l], rw[l], torch.float32)
        close(f"triton grad_b[{l}]", gb[l], rb[l], torch.float32)


# ---- bad inputs ------------------------------------------------------------------------------
def _good():
    return make_mlp([3, 5, 2], 2, 4, "mse", torch.float64)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_bad_inputs_raise_clear_errors(backend):
    ws, bs, x, y = _good()
    f = lambda *a, **k: mlp_loss_and_grad(*a, backend=backend, **k)  # noqa: E731
    with pytest.raises(TypeError, match=r"weights\[0\] must be float32 or float64"):
        f([ws[0].int(), ws[1]], bs, x, y)
    with pytest.raises(TypeError, match=r"biases\[1\] must have dtype torch.float64"):
        f(ws, [bs[0], bs[1].float()], x, y)
    with pytest.raises(ValueError, match=r"x must be on cpu"):
        f(ws, bs, x.to("meta"), y)
    with pytest.raises(ValueError, match=r"weights\[1\] takes 4 inputs but layer 0 has 5 outputs"):
        f([ws[0], torch.randn(2, 2, 4, dtype=torch.float64)], bs, x, y)
    with pytest.raises(ValueError, match=r"biases\[0\] must have shape"):
        f(ws, [torch.randn(2, 3, dtype=torch.float64), bs[1]], x, y)
    with pytest.raises(ValueError, match=r"x must be contiguous"):
        f(ws, bs, x.transpose(0, 1).contiguous().transpose(0, 1), y)
    with pytest.raises(ValueError, match=r"weights\[0\] must be contiguous"):
        f([ws[0].transpose(1, 2).contiguous().transpose(1, 2), ws[1]], bs, x, y)
    with pytest.raises(ValueError, match=r"x must hold T=2 tasks"):
        f(ws, bs, x[:1], y[:1])
    with pytest.raises(ValueError, match=r"y must have shape"):
        f(ws, bs, x, y[:, :3])
    with pytest.raises(ValueError, match="activation must be one of"):
        f(ws, bs, x, y, activation="gelu")
    with pytest.raises(ValueError, match="loss must be one of"):
        f(ws, bs, x, y, loss="l1")
    with pytest.raises(TypeError, match="y must be int64 class labels"):
        f(ws, bs, x, y, loss="cross_entropy")
    with pytest.raises(ValueError, match=r"y holds labels outside \[0, 2\)"):
        f(ws, bs, x, torch.full((2, 4), 2), loss="cross_entropy")
    with pytest.raises(TypeError, match="weights must be a list or tuple"):
        f(ws[0], bs, x, y)
    z = [torch.zeros(0, *w.shape[1:], dtype=w.dtype) for w in ws]
    zb = [torch.zeros(0, *b.shape[1:], dtype=b.dtype) for b in bs]
    with pytest.raises(ValueError, match=r"T = 0"):
        f(z, zb, x[:0], y[:0])
    vw = [torch.zeros_like(w) for w in ws]
    vb = [torch.zeros_like(b) for b in bs]
    with pytest.raises(ValueError, match=r"v_weights\[0\] must have shape \(2, 5, 3\)"):
        mlp_hvp(ws, bs, x, y, [v[:1].contiguous() for v in vw], [v[:1].contiguous() for v in vb], backend=backend)


def test_ops_exported():
    assert fastmaml.ops.mlp_loss_and_grad is mlp_loss_and_grad
    assert fastmaml.ops.mlp_hvp is mlp_hvp
