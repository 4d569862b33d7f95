"""Triton MLP kernels (``fastmaml.triton.mlp``) against the reference twins and against
``torch.func.jvp(grad(...))``.

Without a GPU these run under ``TRITON_INTERPRET=1`` (set by conftest.py) on CPU tensors,
on tiny shapes (the interpreter costs tens of ms per program instance here): widths and
N are chosen to be not multiples of the 16-wide interpreter tiles and to span several
tiles. The ``cuda`` test repeats the checks on a GPU with the 784-256-128-64-64-5 net.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import grad, jvp

from fastmaml.reference import mlp as ref
from fastmaml.triton import mlp as tmlp

# (atol, rtol) against a float64 reference. float32: rounding of sums of a few dozen terms.
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 1e-4)}


def make_problem(T, dims, N, dtype, loss, *, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(T, o, i, generator=g, dtype=torch.float64) / i**0.5 for i, o in zip(dims[:-1], dims[1:])]
    bs = [0.3 * torch.randn(T, o, generator=g, dtype=torch.float64) for o in dims[1:]]
    x = torch.randn(T, N, dims[0], generator=g, dtype=torch.float64)
    if loss == "mse":
        y = torch.randn(T, N, dims[-1], generator=g, dtype=torch.float64).to(device, dtype)
    else:
        y = torch.randint(0, dims[-1], (T, N), generator=g).to(device)
    vws = [torch.randn(w.shape, generator=g, dtype=torch.float64) for w in ws]
    vbs = [torch.randn(b.shape, generator=g, dtype=torch.float64) for b in bs]
    cast = lambda ts: [t.to(device, dtype) for t in ts]  # noqa: E731
    return cast(ws), cast(bs), x.to(device, dtype), y, cast(vws), cast(vbs)


def assert_close(name, got, want, dtype):
    """|got − want| ≤ atol + rtol·|want| elementwise; the message names the worst element."""
    atol, rtol = TOL[dtype]
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == dtype, f"{name}: dtype {got.dtype} != {dtype}"
    got64, want64 = got.detach().double().cpu(), want.detach().double().cpu()
    err = (got64 - want64).abs()
    bad = err > atol + rtol * want64.abs()
    worst = int(err.argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), err.shape))
    assert not bool(bad.any()), (
        f"{name}: {int(bad.sum())}/{err.numel()} elements off; worst at {idx}: "
        f"got {got64.flatten()[worst].item():.17g}, want {want64.flatten()[worst].item():.17g}, "
        f"|err| {err.flatten()[worst].item():.3g} (atol {atol:g}, rtol {rtol:g})"
    )
    return err.max().item()


def jvp_grad_hvp(ws, bs, x, y, vws, vbs, activation, loss):
    """Per-task HVP by forward-over-reverse torch.func (the task losses are independent,
    so the Hessian of their sum is block-diagonal: H v = per-task H_t v_t)."""
    L = len(ws)

    def total(params):
        return ref.mlp_loss(params[:L], params[L:], x, y, activation=activation, loss=loss).sum()

    _, hv = jvp(grad(total), (list(ws) + list(bs),), (list(vws) + list(vbs),))
    return hv[:L], hv[L:]


def check_all(T, dims, N, dtype, activation, loss, *, seed=0, device="cpu", with_jvp=True):
    """Loss, gradient and HVP of the Triton kernels against the float64 reference; returns
    the worst absolute error over everything compared."""
    ws, bs, x, y, vws, vbs = make_problem(T, dims, N, dtype, loss, seed=seed, device=device)
    # ground truth in float64 (for float32 inputs: the same rounded inputs, upcast)
    up = lambda ts: [t.double() for t in ts]  # noqa: E731
    y64 = y.double() if loss == "mse" else y
    kw = dict(activation=activation, loss=loss)
    before = [t.clone() for t in ws + bs + vws + vbs + [x, y]]

    lt, gw, gb = tmlp.mlp_loss_and_grad(ws, bs, x, y, **kw)
    lr, gwr, gbr = ref.mlp_loss_and_grad(up(ws), up(bs), x.double(), y64, **kw)
    worst = assert_close("loss", lt, lr, dtype)
    for l in range(len(ws)):
        worst = max(worst, assert_close(f"grad_w[{l}]", gw[l], gwr[l], dtype))
        worst = max(worst, assert_close(f"grad_b[{l}]", gb[l], gbr[l], dtype))

    hw, hb = tmlp.mlp_hvp(ws, bs, x, y, vws, vbs, **kw)
    hwr, hbr = ref.mlp_hvp(up(ws), up(bs), x.double(), y64, up(vws), up(vbs), **kw)
    for l in range(len(ws)):
        worst = max(worst, assert_close(f"hvp_w[{l}] vs reference", hw[l], hwr[l], dtype))
        worst = max(worst, assert_close(f"hvp_b[{l}] vs reference", hb[l], hbr[l], dtype))
    if with_jvp:
        hwj, hbj = jvp_grad_hvp(up(ws), up(bs), x.double(), y64, up(vws), up(vbs), activation, loss)
        for l in range(len(ws)):
            worst = max(worst, assert_close(f"hvp_w[{l}] vs jvp(grad)", hw[l], hwj[l], dtype))
            worst = max(worst, assert_close(f"hvp_b[{l}] vs jvp(grad)", hb[l], hbj[l], dtype))

    for a, b in zip(before, ws + bs + vws + vbs + [x, y]):  # inputs untouched
        assert torch.equal(a, b)
    return worst


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_mlp_triton_matches_reference(activation, loss, dtype):
    # widths 40 (3 tiles of 16), 17 (2), 3; N = 19 (2 row tiles): nothing a tile multiple
    worst = check_all(2, [5, 40, 17, 3], 19, dtype, activation, loss, seed=1)
    print(f"{activation}/{loss}/{dtype}: worst |err| {worst:.3g}")


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_mlp_triton_single_task_single_layer(loss):
    # T = 1; L = 1 (a linear model: no hidden layer, no δ_0); N = 1
    check_all(1, [7, 4], 1, torch.float64, "relu", loss, seed=2)


def test_mlp_triton_deep_exact_tiles_and_many_classes():
    # widths exactly one and two tiles, 4 layers; 20 classes (padded to a 32-wide head)
    check_all(3, [16, 32, 16, 9, 20], 16, torch.float64, "tanh", "cross_entropy", seed=3, with_jvp=False)


def test_mlp_triton_noncontiguous_inputs():
    ws, bs, x, y, vws, vbs = make_problem(2, [6, 18, 2], 5, torch.float64, "mse", seed=4)
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)  # same values, non-contiguous view
    wt = [w.transpose(1, 2).contiguous().transpose(1, 2) for w in ws]
    assert not xt.is_contiguous() and not wt[0].is_contiguous()
    lt, gw, gb = tmlp.mlp_loss_and_grad(wt, bs, xt, y)
    lr, gwr, gbr = ref.mlp_loss_and_grad(ws, bs, x, y)
    assert_close("loss", lt, lr, torch.float64)
    for a, b in zip(gw + gb, gwr + gbr):
        assert_close("grad", a, b, torch.float64)


def test_mlp_triton_bad_inputs():
    ws, bs, x, y, vws, vbs = make_problem(2, [3, 5, 2], 4, torch.float64, "mse")
    _, _, _, yc, _, _ = make_problem(2, [3, 5, 2], 4, torch.float64, "cross_entropy")
    with pytest.raises(ValueError, match="activation"):
        tmlp.mlp_loss_and_grad(ws, bs, x, y, activation="gelu")
    with pytest.raises(ValueError, match="loss"):
        tmlp.mlp_loss_and_grad(ws, bs, x, y, loss="l1")
    with pytest.raises(TypeError, match="x must be float32 or float64"):
        tmlp.mlp_loss_and_grad(ws, bs, x.half(), y)
    with pytest.raises(TypeError, match=r"weights\[1\] must have dtype"):
        tmlp.mlp_loss_and_grad([ws[0], ws[1].float()], bs, x, y)
    with pytest.raises(ValueError, match=r"weights\[1\] must have shape"):
        tmlp.mlp_loss_and_grad([ws[0], ws[1][:, :, :4]], bs, x, y)
    with pytest.raises(ValueError, match=r"biases\[0\] must have shape"):
        tmlp.mlp_loss_and_grad(ws, [bs[0][:1], bs[1]], x, y)
    with pytest.raises(ValueError, match="biases must hold"):
        tmlp.mlp_loss_and_grad(ws, bs[:1], x, y)
    with pytest.raises(ValueError, match="x must have T >= 1"):
        tmlp.mlp_loss_and_grad([w[:0] for w in ws], [b[:0] for b in bs], x[:0], y[:0])
    with pytest.raises(ValueError, match="y must have shape"):
        tmlp.mlp_loss_and_grad(ws, bs, x, y[:, :, :1])
    with pytest.raises(TypeError, match="int64 class labels"):
        tmlp.mlp_loss_and_grad(ws, bs, x, y, loss="cross_entropy")
    with pytest.raises(ValueError, match="outside"):
        tmlp.mlp_loss_and_grad(ws, bs, x, yc + 2, loss="cross_entropy")
    with pytest.raises(TypeError, match="list or tuple"):
        tmlp.mlp_loss_and_grad(ws[0], bs, x, y)
    with pytest.raises(ValueError, match=r"v_biases\[1\] must have shape"):
        tmlp.mlp_hvp(ws, bs, x, y, vws, [vbs[0], vbs[1][:, :1]])
    with pytest.raises(ValueError, match="v_weights and v_biases must hold"):
        tmlp.mlp_hvp(ws, bs, x, y, vws[:1], vbs)
    wide = [torch.zeros(2, tmlp.MAX_HEAD_WIDTH + 1, 3, dtype=torch.float64)]
    with pytest.raises(ValueError, match="last layer's width"):
        tmlp.mlp_loss_and_grad(wide, [torch.zeros(2, tmlp.MAX_HEAD_WIDTH + 1, dtype=torch.float64)], x, y)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_mlp_triton_cuda_wide(activation, loss, dtype):
    # Omniglot's non-convolutional MAML net, 5-way: support N = 5, query N = 75, T = 32
    for N in (5, 75):
        worst = check_all(32, [784, 256, 128, 64, 64, 5], N, dtype, activation, loss, device="cuda")
        print(f"cuda {activation}/{loss}/{dtype} N={N}: worst |err| {worst:.3g}")
