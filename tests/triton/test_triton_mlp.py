"""Triton MLP kernels (``fastmaml.triton.mlp``) against the reference twins and against
``torch.func.jvp(grad(...))``.

With a GPU they run on GPU tensors (the ``triton_device`` fixture); without one under
``TRITON_INTERPRET=1`` (set by conftest.py) on CPU tensors, on tiny shapes (the
interpreter costs tens of ms per program instance here): widths and N are chosen to be
not multiples of the 16-wide interpreter tiles and to span several tiles. The ``cuda``
test repeats the checks on a GPU with the 784-256-128-64-64-5 net.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close
from torch.func import grad, jvp

from fastmaml.reference import mlp as ref
from fastmaml.triton import mlp as tmlp

pytestmark = pytest.mark.triton

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


def close(name, got, want, dtype) -> float:
    """:func:`helpers.assert_close` with the Triton tolerance (elementwise atol + rtol·|want|,
    dtype checked); returns the largest absolute error."""
    atol, rtol = TOL[dtype]
    assert_close(name, got, want, atol=atol, rtol=rtol, dtype=dtype)
    return (got.detach().double().cpu() - want.detach().double().cpu()).abs().max().item()


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
    worst = close("loss", lt, lr, dtype)
    for l in range(len(ws)):
        worst = max(worst, close(f"grad_w[{l}]", gw[l], gwr[l], dtype))
        worst = max(worst, close(f"grad_b[{l}]", gb[l], gbr[l], dtype))

    hw, hb = tmlp.mlp_hvp(ws, bs, x, y, vws, vbs, **kw)
    hwr, hbr = ref.mlp_hvp(up(ws), up(bs), x.double(), y64, up(vws), up(vbs), **kw)
    for l in range(len(ws)):
        worst = max(worst, close(f"hvp_w[{l}] vs reference", hw[l], hwr[l], dtype))
        worst = max(worst, close(f"hvp_b[{l}] vs reference", hb[l], hbr[l], dtype))
    if with_jvp:
        hwj, hbj = jvp_grad_hvp(up(ws), up(bs), x.double(), y64, up(vws), up(vbs), activation, loss)
        for l in range(len(ws)):
            worst = max(worst, close(f"hvp_w[{l}] vs jvp(grad)", hw[l], hwj[l], dtype))
            worst = max(worst, close(f"hvp_b[{l}] vs jvp(grad)", hb[l], hbj[l], dtype))

    for a, b in zip(before, ws + bs + vws + vbs + [x, y]):  # inputs untouched
        assert torch.equal(a, b)
    return worst


# N = 11 fits one 16-row tile: the head kernel also does the last layer's backward;
# N = 19 spans two: the head writes δ_L and a separate backward launch follows.
@pytest.mark.parametrize(
    "dtype,N", [(torch.float64, 11), (torch.float64, 19), (torch.float32, 19)], ids=["f64-fused", "f64", "f32"]
)
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_mlp_triton_matches_reference(triton_device, activation, loss, dtype, N):
    # widths 24, 17 (2 tiles of 16 each), 3: none a tile multiple
    worst = check_all(2, [5, 24, 17, 3], N, dtype, activation, loss, seed=1, device=triton_device)
    print(f"{activation}/{loss}/{dtype}/N={N}: worst |err| {worst:.3g}")


@pytest.mark.parametrize("N", [1, 19])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_mlp_triton_single_task_single_layer(triton_device, loss, N):
    # T = 1; L = 1 (a linear model: no hidden layer, no δ_0)
    check_all(1, [7, 4], N, torch.float64, "relu", loss, seed=2, device=triton_device)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_mlp_triton_launch_count(triton_device, monkeypatch, fused):
    # L = 3: 2 hidden-layer forwards + head + backward launches; the head does layer L's
    # backward too when one row tile covers N (2L − 1 launches), else 2L. Row tiles of
    # the head: 16 under the interpreter, up to 128 on a GPU (float32, 2 outputs).
    N = 4 if fused else (19 if triton_device == "cpu" else 200)
    expected = 5 if fused else 6
    launches = []
    for name in ("_mlp_fwd_kernel", "_mlp_head_kernel", "_mlp_bwd_kernel"):
        kernel = getattr(tmlp, name)
        orig = kernel.run

        def run(*args, _orig=orig, _name=name, **kwargs):
            launches.append(_name)
            return _orig(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", run)
    ws, bs, x, y, vws, vbs = make_problem(1, [3, 5, 4, 2], N, torch.float32, "mse", device=triton_device)
    tmlp.mlp_loss_and_grad(ws, bs, x, y)
    assert len(launches) == expected, launches
    launches.clear()
    tmlp.mlp_hvp(ws, bs, x, y, vws, vbs)
    assert len(launches) == expected, launches


def test_mlp_triton_deep_exact_tiles_and_many_classes(triton_device):
    # widths exactly one and two tiles, 4 layers; 20 classes (padded to a 32-wide head)
    check_all(3, [16, 32, 16, 9, 20], 16, torch.float64, "tanh", "cross_entropy", seed=3, device=triton_device)


def test_mlp_triton_noncontiguous_inputs(triton_device):
    ws, bs, x, y, vws, vbs = make_problem(2, [6, 18, 2], 5, torch.float64, "mse", seed=4, device=triton_device)
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)  # same values, non-contiguous view
    wt = [w.transpose(1, 2).contiguous().transpose(1, 2) for w in ws]
    assert not xt.is_contiguous() and not wt[0].is_contiguous()
    lt, gw, gb = tmlp.mlp_loss_and_grad(wt, bs, xt, y)
    lr, gwr, gbr = ref.mlp_loss_and_grad(ws, bs, x, y)
    close("loss", lt, lr, torch.float64)
    for a, b in zip(gw + gb, gwr + gbr):
        close("grad", a, b, torch.float64)


def test_mlp_triton_bad_inputs(triton_device):
    ws, bs, x, y, vws, vbs = make_problem(2, [3, 5, 2], 4, torch.float64, "mse", device=triton_device)
    _, _, _, yc, _, _ = make_problem(2, [3, 5, 2], 4, torch.float64, "cross_entropy", device=triton_device)
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
    wide = [torch.zeros(2, tmlp.MAX_HEAD_WIDTH + 1, 3, dtype=torch.float64, device=triton_device)]
    wide_b = [torch.zeros(2, tmlp.MAX_HEAD_WIDTH + 1, dtype=torch.float64, device=triton_device)]
    with pytest.raises(ValueError, match="last layer's width"):
        tmlp.mlp_loss_and_grad(wide, wide_b, x, y)
    if triton_device == "cuda":
        with pytest.raises(ValueError, match="y must be on"):
            tmlp.mlp_loss_and_grad(ws, bs, x, y.cpu())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_mlp_triton_cuda_wide(activation, loss, dtype):
    # Omniglot's non-convolutional MAML net, 5-way: support N = 5, query N = 75, T = 32;
    # N = 200 spans several head row tiles (unfused last-layer backward)
    for N in (5, 75, 200):
        worst = check_all(32, [784, 256, 128, 64, 64, 5], N, dtype, activation, loss, device="cuda")
        print(f"cuda {activation}/{loss}/{dtype} N={N}: worst |err| {worst:.3g}")


# Compiles the GPU form of the kernels (Triton front end, LLVM, ptxas) for sm_90 without a
# GPU, in a subprocess without TRITON_INTERPRET: catches code that only the interpreter
# accepts. The variants chosen hold every code path (HVP, tanh's σ'' terms, both losses,
# the fused and unfused head, float32 tl.dot and the float64 broadcast product); all 192
# variants (sm_80 and sm_90) were compiled this way during development.
_COMPILE_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastmaml.triton import mlp as m

def compile_(fn, ptrs, ints, const):
    sig = dict(ptrs, **{k: "i32" for k in ints}, **{k: "constexpr" for k in const})
    triton.compile(ASTSource(fn, sig, const), target=GPUTarget("cuda", 90, 32))

n = 0
for ty, fp64, (bm, bn, bk) in (("*fp32", False, (64, 64, 32)), ("*fp64", True, (16, 16, 16))):
    common = dict(ACT=1, PREV_ACT=True, HVP=True, IS_FP64=fp64)
    if not fp64:
        compile_(m._mlp_fwd_kernel, {k: ty for k in "hp_ptr rzp_ptr w_ptr b_ptr vw_ptr vb_ptr h_ptr rz_ptr".split()},
                 ["N", "K", "M"], dict(common, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk))
        n += 1
    compile_(m._mlp_bwd_kernel, {k: ty for k in "d_ptr rd_ptr w_ptr vw_ptr hp_ptr rzp_ptr gw_ptr gb_ptr dp_ptr rdp_ptr".split()},
             ["N", "K", "M", "n_gw_tiles"], dict(common, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk))
    n += 1
    for loss, fuse in ((1, True),) if fp64 else ((0, False), (1, True)):
        ptrs = {k: ty for k in "hp_ptr rzp_ptr w_ptr b_ptr vw_ptr vb_ptr y_ptr part_ptr d_ptr rd_ptr gw_ptr gb_ptr dp_ptr rdp_ptr".split()}
        if loss == 1:
            ptrs["y_ptr"] = "*i64"
        compile_(m._mlp_head_kernel, ptrs, ["N", "K", "C"],
                 dict(common, LOSS=loss, FUSE_BWD=fuse, BLOCK_M=bm, BLOCK_C=16, BLOCK_K=bk))
        n += 1
print("compiled", n)
"""


def test_mlp_triton_kernels_compile_for_gpu():
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT], env=env, cwd=root, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-4000:]
    assert "compiled 6" in r.stdout, r.stdout
