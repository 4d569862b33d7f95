"""Emulated twins of the GPU tests of the MLP ops: ``mlp_loss_and_grad`` and ``mlp_hvp``
(loss_and_grad_kernel, hvp_kernel: one CTA per task, workspace in shared memory, or in
global memory past the 227 KiB of sm_90) and ``maml_mlp`` (maml_kernel and
reduce_tasks_kernel: every lr granularity, first and second order, both losses and
activations, MSL weights, no-grad forward; widths at and past the shared-memory limit so
that the fit check and the fallback are exercised), float32 and float64, each against the
reference; and ``MAML(..., backend="cuda")`` taking the fused MLP path."""

from __future__ import annotations

import sys

import pytest
import torch

import fastmaml
from fastmaml import ops
from fastmaml.ops import maml_mlp_fit
from fastmaml import reference as ref

MM = maml_mlp_fit  # fused_limits, fits_fused, fused_workspace_bytes
BACKEND = "cuda"
# (rtol, atol) relative to the largest magnitude: float64 1e-10, float32 to rounding
TOL = {torch.float64: (1e-10, 1e-13), torch.float32: (2e-4, 1e-6)}


def close(name, got, want, dtype):
    rtol, atol = TOL[dtype]
    got, want = got.double(), want.double()
    scale = float(want.abs().max()) if want.numel() else 0.0
    err = float((got - want).abs().max()) if want.numel() else 0.0
    assert err <= rtol * scale + atol, f"{name}: max error {err:.3e} vs max |want| {scale:.3e}"


def stats():
    return sys.modules["fastmaml._C"].cuda_emulation_stats()


def make_mlp(dims, T, N, loss, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = len(dims) - 1
    ws = [torch.randn(T, dims[l + 1], dims[l], generator=g, dtype=dtype) / dims[l] ** 0.5 for l in range(L)]
    bs = [0.1 * torch.randn(T, dims[l + 1], generator=g, dtype=dtype) for l in range(L)]
    x = torch.randn(T, N, dims[0], generator=g, dtype=dtype)
    y = (torch.randn(T, N, dims[-1], generator=g, dtype=dtype) if loss == "mse"
         else torch.randint(0, dims[-1], (T, N), generator=g))
    return ws, bs, x, y


def check_ops(dims, T, N, dtype, activation, loss):
    ws, bs, x, y = make_mlp(dims, T, N, loss, dtype)
    g = torch.Generator().manual_seed(1)
    vw = [torch.randn(w.shape, generator=g, dtype=dtype) for w in ws]
    vb = [torch.randn(b.shape, generator=g, dtype=dtype) for b in bs]
    kw = {"activation": activation, "loss": loss}
    lt, gw, gb = ops.mlp_loss_and_grad(ws, bs, x, y, backend=BACKEND, **kw)
    rl, rw, rb = ref.mlp_loss_and_grad(ws, bs, x, y, **kw)
    close("loss", lt, rl, dtype)
    for l in range(len(ws)):
        close(f"grad_w[{l}]", gw[l], rw[l], dtype)
        close(f"grad_b[{l}]", gb[l], rb[l], dtype)
    hw, hb = ops.mlp_hvp(ws, bs, x, y, vw, vb, backend=BACKEND, **kw)
    rhw, rhb = ref.mlp_hvp(ws, bs, x, y, vw, vb, **kw)
    for l in range(len(ws)):
        close(f"hv_w[{l}]", hw[l], rhw[l], dtype)
        close(f"hv_b[{l}]", hb[l], rhb[l], dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("dims", [[1, 12, 12, 1], [3, 17, 9, 5], [6, 3]], ids=lambda d: "-".join(map(str, d)))
def test_emulated_loss_grad_hvp_match_reference(dims, loss, activation, dtype):
    check_ops(dims, 3, 7, dtype, activation, loss)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_emulated_loss_grad_hvp_global_memory_workspace(dtype):
    """A per-task workspace past 227 KiB: the kernels take it from global memory."""
    dims = [2, 150, 160, 2]  # PT ≈ 49k elements: 196 KB (float32) / 393 KB (float64) with the activations
    before = {k: stats().get(k, {}).get("launches", 0) for k in ("loss_and_grad_kernel", "hvp_kernel")}
    check_ops(dims, 2, 4, dtype, "tanh", "mse")
    for k, n in before.items():
        assert stats()[k]["launches"] > n


def problem(dims, T, Ns, Nq, loss, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = len(dims) - 1
    ws = [(torch.randn(dims[l + 1], dims[l], generator=g, dtype=dtype) / dims[l] ** 0.5).requires_grad_()
          for l in range(L)]
    bs = [(0.1 * torch.randn(dims[l + 1], generator=g, dtype=dtype)).requires_grad_() for l in range(L)]
    xs = torch.randn(T, Ns, dims[0], generator=g, dtype=dtype)
    xq = torch.randn(T, Nq, dims[0], generator=g, dtype=dtype)
    if loss == "mse":
        ys = torch.randn(T, Ns, dims[-1], generator=g, dtype=dtype)
        yq = torch.randn(T, Nq, dims[-1], generator=g, dtype=dtype)
    else:
        ys = torch.randint(0, dims[-1], (T, Ns), generator=g)
        yq = torch.randint(0, dims[-1], (T, Nq), generator=g)
    return ws, bs, xs, ys, xq, yq


def make_lr(kind, K, ws, bs, dtype, requires_grad=True):
    g = torch.Generator().manual_seed(1)
    shapes = [p.shape for pair in zip(ws, bs) for p in pair]
    if kind == "float":
        return 0.1
    if kind == "scalar":
        t = torch.tensor(0.1, dtype=dtype)
    elif kind == "table":
        t = 0.05 + 0.1 * torch.rand(K, len(shapes), generator=g, dtype=dtype)
    elif kind == "elem":
        return [(0.05 + 0.1 * torch.rand(s, generator=g, dtype=dtype)).requires_grad_(requires_grad) for s in shapes]
    else:  # step_elem
        return [(0.05 + 0.1 * torch.rand(K, *s, generator=g, dtype=dtype)).requires_grad_(requires_grad)
                for s in shapes]
    return t.requires_grad_(requires_grad)


def lr_list(lr):
    return [lr] if isinstance(lr, torch.Tensor) else (list(lr) if isinstance(lr, list) else [])


def check_maml(dims, T, Ns, Nq, K, lr_kind, first_order, dtype, *, loss="mse", activation="relu", msl=None,
               lr_grad=True):
    ws, bs, xs, ys, xq, yq = problem(dims, T, Ns, Nq, loss, dtype)
    lr = make_lr(lr_kind, K, ws, bs, dtype, lr_grad)
    kw = dict(steps=K, first_order=first_order, loss=loss, activation=activation, msl_weights=msl)
    wrt = ws + bs + [t for t in lr_list(lr) if t.requires_grad]
    m = ops.maml_mlp(ws, bs, xs, ys, xq, yq, lr, backend=BACKEND, **kw)
    g = torch.autograd.grad(m, wrt)
    r = ref.maml_mlp(ws, bs, xs, ys, xq, yq, lr, **kw)
    gr = torch.autograd.grad(r, wrt)
    close("meta-loss", m.detach(), r.detach(), dtype)
    for i, (a, b) in enumerate(zip(g, gr)):
        close(f"meta-grad[{i}]", a, b, dtype)
    g2 = torch.autograd.grad(ops.maml_mlp(ws, bs, xs, ys, xq, yq, lr, backend=BACKEND, **kw), wrt)
    assert all(torch.equal(a, b) for a, b in zip(g, g2)), "meta-gradient not bitwise reproducible"
    with torch.no_grad():  # the forward-only launch (need_grad = False)
        close("no-grad meta-loss", ops.maml_mlp(ws, bs, xs, ys, xq, yq, lr, backend=BACKEND, **kw), r.detach(), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("lr_kind", ["float", "scalar", "table", "elem", "step_elem"])
def test_emulated_maml_mlp_matches_reference(lr_kind, first_order, dtype):
    before = stats().get("maml_kernel", {}).get("launches", 0)
    check_maml([1, 10, 10, 1], 3, 4, 5, 2, lr_kind, first_order, dtype)
    assert stats()["maml_kernel"]["launches"] > before  # the fused kernel ran (not the fallback)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("activation,loss", [("tanh", "mse"), ("relu", "cross_entropy"), ("tanh", "cross_entropy")])
def test_emulated_maml_mlp_variants(activation, loss, dtype):
    msl = torch.tensor([0.25, 0.0, 0.75], dtype=dtype)  # multi-step loss with a zero weight
    check_maml([3, 8, 6, 4], 2, 5, 4, 3, "table", False, dtype, loss=loss, activation=activation, msl=msl)
    check_maml([3, 8, 6, 4], 2, 5, 4, 2, "elem", False, dtype, loss=loss, activation=activation, lr_grad=False)


def _just_fits_and_past(dtype):
    """The widest [1, w, w, 1] whose per-task workspace fits the emulated device (sm_90:
    227 KiB, less the reduction scratch), and the next one that does not."""
    limit = MM.fused_limits("cpu", backend=BACKEND)["max_workspace_bytes"]
    K, Ns, Nq = 1, 2, 2
    w = 8
    while MM.fused_workspace_bytes([1, w + 1, w + 1, 1], K, Ns, Nq, dtype) <= limit:
        w += 1
    return [1, w, w, 1], [1, w + 1, w + 1, 1], (K, Ns, Nq), limit


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_emulated_maml_mlp_at_and_past_the_shared_memory_limit(dtype):
    fit, past, (K, Ns, Nq), limit = _just_fits_and_past(dtype)
    assert MM.fits_fused(fit, K, Ns, Nq, dtype=dtype, backend=BACKEND)[0]
    ok, why = MM.fits_fused(past, K, Ns, Nq, dtype=dtype, backend=BACKEND)
    assert not ok and str(limit) in why
    n0 = stats().get("maml_kernel", {}).get("launches", 0)
    check_maml(fit, 1, Ns, Nq, K, "float", True, dtype)  # fused: the kernel at its shared-memory limit
    n1 = stats()["maml_kernel"]["launches"]
    assert n1 > n0
    check_maml(past, 1, Ns, Nq, K, "float", True, dtype)  # falls back to the layer-wise ops
    assert stats()["maml_kernel"]["launches"] == n1


def test_emulated_frozen_step_lrs_fit_check_matches_the_launch():
    """Defect: the fit check counted the lr as learned only when it required grad while the
    launch reserved K gradient slots for any lr tensor ([1, 40, 40, 1] float32, K = 6, frozen
    per-step lrs passed the check at 207,928 B and the launch then asked for 243,724 B)."""
    dims, K, Ns, Nq, dtype = [1, 40, 40, 1], 6, 10, 10, torch.float32
    limit = MM.fused_limits("cpu", backend=BACKEND)["max_workspace_bytes"]
    frozen = MM.fused_workspace_bytes(dims, K, Ns, Nq, dtype, lr_learned=False)
    learned = MM.fused_workspace_bytes(dims, K, Ns, Nq, dtype, lr_learned=True)
    assert frozen <= limit < learned, (frozen, limit, learned)
    n0 = stats().get("maml_kernel", {}).get("launches", 0)
    check_maml(dims, 2, Ns, Nq, K, "step_elem", True, dtype, lr_grad=False)
    assert stats()["maml_kernel"]["launches"] > n0  # fused, and the launch fitted
    # a learned per-step lr does not fit: the layer-wise fallback, still exact
    n1 = stats()["maml_kernel"]["launches"]
    assert not MM.fits_fused(dims, K, Ns, Nq, dtype=dtype, lr_learned=True, backend=BACKEND)[0]
    check_maml(dims, 1, Ns, Nq, K, "step_elem", True, dtype, lr_grad=True)
    assert stats()["maml_kernel"]["launches"] == n1 + 1  # only check_maml's no-grad forward (no gradient slots)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_emulated_maml_layer_takes_the_fused_path(dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 1)).to(dtype)
    meta = fastmaml.MAML(model, inner_lr=0.05, inner_steps=2, backend=BACKEND)
    ref_meta = fastmaml.MAML(model, inner_lr=0.05, inner_steps=2, backend="reference")
    xs, ys, xq, yq = (torch.randn(3, 5, 1, dtype=dtype) for _ in range(4))
    loss = meta(xs, ys, xq, yq)
    assert meta.path == "fused_mlp", meta.path_reason
    g = torch.autograd.grad(loss, list(model.parameters()))
    r = ref_meta(xs, ys, xq, yq)
    gr = torch.autograd.grad(r, list(model.parameters()))
    close("MAML loss", loss.detach(), r.detach(), dtype)
    for a, b in zip(g, gr):
        close("MAML grad", a, b, dtype)
