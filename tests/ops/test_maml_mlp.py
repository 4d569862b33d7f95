"""fastmaml.ops.maml_mlp (fused and layer-wise): beyond the op-vs-twin agreement (the
registry, tests/ops/test_registry.py), shapes, the fused limit and its checks, the
workspace formula, reproducibility, gradients, bad inputs, and the GPU (``cuda``)."""

from __future__ import annotations

import pytest
import torch

import fastmaml
from fastmaml import reference as ref
from fastmaml.maml.mlp_path import supports
from fastmaml.ops import maml_mlp
from fastmaml.ops import maml_mlp_fit as FIT
from fastmaml.ops._maml_mlp import function as FN

from tests.ops.maml_mlp_cases import PATHS, check, close, lr_tensors, make_lr, problem, use_path


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """Runs maml_mlp on the fused cpu kernel, or on the layer-wise path (cpu ops, reference ops)."""
    return use_path(request.param, monkeypatch)


@pytest.mark.parametrize("case", [
    dict(dims=[1, 40, 40, 1], T=4, Ns=10, Nq=10, K=5),          # sinusoid
    dict(dims=[2, 5], T=1, Ns=1, Nq=3, K=1),                     # one layer, T = 1, K = 1, one point
    dict(dims=[5, 19, 13, 11, 3], T=2, Ns=13, Nq=7, K=2),        # odd widths, N not a multiple of a tile
    dict(dims=[4, 33, 17, 9], T=3, Ns=17, Nq=9, K=4, msl=True),
], ids=["sinusoid", "tiny", "odd", "msl"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("lr_kind", ["scalar", "fixed_table"])  # fixed_table: the CPU's fused backward + SGD step
@pytest.mark.parametrize("first_order", [False, True])
def test_shapes(path, case, dtype, lr_kind, first_order):
    case = dict(case)
    check(case.pop("dims"), case.pop("T"), case.pop("Ns"), case.pop("Nq"), case.pop("K"), dtype=dtype,
          lr_kind=lr_kind, first_order=first_order, backend=path, **case)


def test_fused_limit_boundary(monkeypatch):
    """At the limit the fused kernel runs; one byte below it the layer-wise path does; same numbers."""
    dims, T, Ns, Nq, K = [3, 24, 24, 2], 2, 7, 5, 2
    need = FIT.fused_workspace_bytes(dims, K, Ns, Nq, torch.float64, lr_learned=True)
    calls = []
    real = FN.run_fused
    monkeypatch.setattr(FN, "run_fused", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(FIT, "FUSED_CPU_MAX_WORKSPACE_BYTES", need)
    assert FIT.fits_fused(dims, K, Ns, Nq, dtype=torch.float64, lr_learned=True)[0]
    _, g_fused = check(dims, T, Ns, Nq, K, lr_kind="table")
    assert calls == [1]
    monkeypatch.setattr(FIT, "FUSED_CPU_MAX_WORKSPACE_BYTES", need - 1)
    ok, why = FIT.fits_fused(dims, K, Ns, Nq, dtype=torch.float64, lr_learned=True)
    assert not ok and "exceeds" in why
    _, g_layer = check(dims, T, Ns, Nq, K, lr_kind="table")
    assert calls == [1]
    for a, b in zip(g_fused, g_layer):
        close("fused vs layer-wise", a, b, torch.float64)


@pytest.mark.parametrize("lr_learned,n_msl", [(False, 1), (True, 1), (True, 3), (False, 2)])
def test_workspace_formula_matches_kernel(lr_learned, n_msl):
    C = fastmaml._ext.ext()
    for dims, K, Ns, Nq in [([1, 40, 40, 1], 5, 10, 10), ([3, 7, 2], 3, 4, 9), ([5, 9, 8, 7, 3], 4, 13, 2)]:
        n = min(n_msl, K)
        assert FIT.fused_workspace_bytes(dims, K, Ns, Nq, torch.float32, lr_learned=lr_learned, n_msl=n) == \
            4 * C.maml_mlp_workspace_elems(dims, K, Ns, Nq, lr_learned, n)
    # the sinusoid configuration fits an H100's 227 KB of shared memory per block
    assert FIT.fused_workspace_bytes([1, 40, 40, 1], 5, 10, 10, torch.float32) <= 227 * 1024 - 128 * 8


@pytest.mark.parametrize("lr_kind,runs", [("scalar", "run_factored"), ("elem", "run_layerwise")])
def test_wide_model_past_default_limit(lr_kind, runs, monkeypatch):
    """Past the fused limit: the factored path for one rate, the layer-wise path for per-element rates."""
    dims = [64, 1024, 1024, 5]  # ~4.5 MB of parameters per copy: past the 32 MiB workspace at K=5
    ok, why = supports(dims, "relu", steps=5, n_support=5, n_query=15)
    assert not ok and "exceeds" in why
    calls = []
    real = getattr(FN, runs)
    monkeypatch.setattr(FN, runs, lambda *a: calls.append(1) or real(*a))
    check(dims, 2, 5, 4, 2, loss="cross_entropy", lr_kind=lr_kind, dtype=torch.float32)
    assert calls == [1]


def test_bitwise_reproducible_and_thread_count_independent():
    ws, bs, xs, ys, xq, yq = problem([1, 40, 40, 1], 37, 10, 10, "mse", torch.float32)
    lr = torch.tensor(0.01, requires_grad=True)
    C = fastmaml._ext.ext()
    n0 = C.openmp_max_threads()

    def run():
        m = maml_mlp(ws, bs, xs, ys, xq, yq, lr, steps=5, backend="cpu")
        return [m.detach(), *torch.autograd.grad(m, ws + bs + [lr])]

    a, b = run(), run()
    try:
        C.set_num_threads(1)
        c = run()
    finally:
        C.set_num_threads(n0)
    for x, y, z in zip(a, b, c):
        assert torch.equal(x, y) and torch.equal(x, z)


def test_forward_only_no_grad_matches():
    ws, bs, xs, ys, xq, yq = problem([2, 8, 3], 3, 4, 4, "mse", torch.float64)
    with torch.no_grad():
        m = maml_mlp(ws, bs, xs, ys, xq, yq, 0.1, steps=2, backend="cpu")
        r = ref.maml_mlp(ws, bs, xs, ys, xq, yq, 0.1, steps=2)
    close("no-grad meta-loss", m, r, torch.float64)


def test_upstream_gradient_is_applied():
    ws, bs, xs, ys, xq, yq = problem([2, 8, 3], 3, 4, 4, "mse", torch.float64)
    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    m = maml_mlp(ws, bs, xs, ys, xq, yq, lr, steps=2, backend="cpu")
    g1 = torch.autograd.grad(3.5 * m, ws + bs + [lr])
    m = maml_mlp(ws, bs, xs, ys, xq, yq, lr, steps=2, backend="cpu")
    g2 = torch.autograd.grad(m, ws + bs + [lr])
    for a, b in zip(g1, g2):
        close("scaled grad", a, 3.5 * b, torch.float64)


def test_double_backward_raises():
    ws, bs, xs, ys, xq, yq = problem([2, 8, 3], 2, 4, 4, "mse", torch.float64)
    m = maml_mlp(ws, bs, xs, ys, xq, yq, 0.1, steps=2, backend="cpu")
    with pytest.raises(RuntimeError, match="maml_mlp is once-differentiable"):
        torch.autograd.grad(m, ws, create_graph=True)


@pytest.mark.cuda
@pytest.mark.parametrize("lr_kind", ["float", "scalar", "table", "elem", "step_elem"])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_matches_reference(lr_kind, first_order, dtype):
    dims, T, Ns, Nq, K = [1, 40, 40, 1], 5, 10, 10, 3
    ws, bs, xs, ys, xq, yq = problem(dims, T, Ns, Nq, "mse", dtype)
    lr = make_lr(lr_kind, K, ws, bs, dtype)
    cu = lambda t: t.detach().cuda().requires_grad_(t.requires_grad)  # noqa: E731
    cws, cbs = [cu(w) for w in ws], [cu(b) for b in bs]
    clr = cu(lr) if isinstance(lr, torch.Tensor) else ([cu(a) for a in lr] if isinstance(lr, list) else lr)
    m = maml_mlp(cws, cbs, xs.cuda(), ys.cuda(), xq.cuda(), yq.cuda(), clr, steps=K, first_order=first_order,
                 backend="cuda")
    g = torch.autograd.grad(m, cws + cbs + lr_tensors(clr))
    r = ref.maml_mlp(ws, bs, xs, ys, xq, yq, lr, steps=K, first_order=first_order)
    gr = torch.autograd.grad(r, ws + bs + lr_tensors(lr))
    close("cuda meta-loss", m.detach().cpu(), r.detach(), dtype)
    for a, b in zip(g, gr):
        close("cuda grad", a.cpu(), b, dtype)
    m2 = maml_mlp(cws, cbs, xs.cuda(), ys.cuda(), xq.cuda(), yq.cuda(), clr, steps=K, first_order=first_order,
                  backend="cuda")
    g2 = torch.autograd.grad(m2, cws + cbs + lr_tensors(clr))
    assert all(torch.equal(a, b) for a, b in zip(g, g2)), "cuda meta-gradient not bitwise reproducible"


# ---- bad inputs ------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
    ws, bs, xs, ys, xq, yq = problem([3, 5, 2], 2, 4, 4, "mse", torch.float64)

    def f(**over):
        args = dict(weights=ws, biases=bs, xs=xs, ys=ys, xq=xq, yq=yq, lr=0.1)
        kw = dict(steps=2, backend="cpu")
        for k, v in over.items():
            (args if k in args else kw)[k] = v
        return maml_mlp(args.pop("weights"), args.pop("biases"), *args.values(), **kw)

    with pytest.raises(TypeError, match=r"xs must be float32 or float64"):
        f(xs=xs.int())
    with pytest.raises(TypeError, match=r"xq must have dtype torch.float64"):
        f(xq=xq.float())
    with pytest.raises(ValueError, match=r"ys must be on cpu"):
        f(ys=ys.to("meta"))
    with pytest.raises(ValueError, match=r"xq must hold T=2 tasks"):
        f(xq=xq[:1], yq=yq[:1])
    with pytest.raises(ValueError, match=r"xs must be contiguous"):
        f(xs=xs.transpose(0, 1).contiguous().transpose(0, 1))
    with pytest.raises(ValueError, match=r"T = 0"):
        f(xs=xs[:0], ys=ys[:0], xq=xq[:0], yq=yq[:0])
    with pytest.raises(ValueError, match=r"weights\[0\] must be \[out, in\]"):
        f(weights=[w.detach().unsqueeze(0) for w in ws])
    with pytest.raises(ValueError, match=r"lr must be a 0-d tensor or a \[steps, 2L\] = \[2, 4\] table"):
        f(lr=torch.ones(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"lr\[1\] must have shape \(5,\) or \(2, 5\)"):
        f(lr=[torch.ones(5, 3, dtype=torch.float64), torch.ones(4, dtype=torch.float64),
              torch.ones(2, 5, dtype=torch.float64), torch.ones(2, dtype=torch.float64)])
    with pytest.raises(ValueError, match=r"lr as a list must hold 2L = 4 tensors"):
        f(lr=[torch.ones(5, 3, dtype=torch.float64)])
    with pytest.raises(TypeError, match=r"lr must be float32 or float64"):
        f(lr=torch.tensor(1))
    with pytest.raises(TypeError, match=r"lr must be a float, a tensor or a list"):
        f(lr="0.1")
    with pytest.raises(ValueError, match=r"steps must be >= 1"):
        f(steps=0)
    with pytest.raises(ValueError, match=r"msl_weights must have shape \(2,\)"):
        f(msl_weights=torch.ones(3))
    with pytest.raises(ValueError, match="activation must be one of"):
        f(activation="sigmoid")
    with pytest.raises(ValueError, match="xs requires grad"):
        f(xs=xs.clone().requires_grad_())


def test_exported():
    assert fastmaml.ops.maml_mlp is maml_mlp
