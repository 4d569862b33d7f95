"""fastmaml.ops.maml_mlp (fused and layer-wise) against fastmaml.reference.maml_mlp:
values and every gradient (weights, biases, learned learning rates), all variants."""

from __future__ import annotations

import sys

import pytest
import torch

import fastmaml
from fastmaml import reference as ref
from fastmaml.ops import maml_mlp
from tests.maml.cases import assert_close_to_max

MM = sys.modules["fastmaml.ops.maml_mlp"]  # the module (fastmaml.ops.maml_mlp is the function)
TOL = {torch.float64: (1e-10, 1e-13), torch.float32: (2e-4, 1e-6)}


def assert_close(name, got, want, dtype):
    """Compare with a tolerance relative to the largest magnitude; report the worst element."""
    assert_close_to_max(name, got, want, *TOL[dtype])


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


def make_lr(kind, K, ws, bs, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    shapes = [p.shape for pair in zip(ws, bs) for p in pair]
    if kind == "float":
        return 0.1
    if kind == "scalar":
        return torch.tensor(0.1, dtype=dtype, requires_grad=True)
    if kind == "table":
        return (0.05 + 0.1 * torch.rand(K, len(shapes), generator=g, dtype=dtype)).requires_grad_()
    if kind == "elem":
        return [(0.05 + 0.1 * torch.rand(s, generator=g, dtype=dtype)).requires_grad_() for s in shapes]
    if kind == "step_elem":
        return [(0.05 + 0.1 * torch.rand(K, *s, generator=g, dtype=dtype)).requires_grad_() for s in shapes]
    if kind == "mixed_elem":  # some tensors per step, some shared across steps
        return [(0.05 + 0.1 * torch.rand(*((K,) if i % 2 else ()), *s, generator=g, dtype=dtype)).requires_grad_()
                for i, s in enumerate(shapes)]
    raise AssertionError(kind)


def lr_tensors(lr):
    if isinstance(lr, torch.Tensor):
        return [lr]
    if isinstance(lr, list):
        return list(lr)
    return []


def check(dims, T, Ns, Nq, K, *, lr_kind="float", first_order=False, activation="relu", loss="mse", msl=False,
          dtype=torch.float64, backend="cpu", seed=0):
    ws, bs, xs, ys, xq, yq = problem(dims, T, Ns, Nq, loss, dtype, seed)
    lr = make_lr(lr_kind, K, ws, bs, dtype)
    mslw = torch.linspace(0.2, 1.0, K, dtype=dtype) if msl else None
    inputs = ws + bs + lr_tensors(lr)
    before = [t.detach().clone() for t in (*inputs, xs, ys, xq, yq)]
    kw = dict(steps=K, first_order=first_order, activation=activation, loss=loss, msl_weights=mslw)
    got = maml_mlp(ws, bs, xs, ys, xq, yq, lr, backend=backend, **kw)
    g_got = torch.autograd.grad(got, inputs)
    want = ref.maml_mlp(ws, bs, xs, ys, xq, yq, lr, **kw)
    g_want = torch.autograd.grad(want, inputs)
    assert_close("meta-loss", got.detach(), want.detach(), dtype)
    names = [f"W{l}" for l in range(len(ws))] + [f"b{l}" for l in range(len(bs))]
    names += [f"lr[{i}]" for i in range(len(inputs) - len(names))]
    for n, a, b in zip(names, g_got, g_want):
        assert_close(f"d meta / d {n}", a, b, dtype)
    for a, b in zip(before, (*inputs, xs, ys, xq, yq)):
        assert torch.equal(a, b.detach()), "an input was modified in place"
    return got, g_got


@pytest.fixture(params=["fused", "layerwise_cpu", "layerwise_reference"])
def path(request, monkeypatch):
    """Runs maml_mlp on the fused cpu kernel, or on the layer-wise path (cpu ops, reference ops)."""
    if request.param == "fused":
        return "cpu"
    monkeypatch.setattr(MM, "FUSED_CPU_MAX_WORKSPACE_BYTES", 0)  # nothing fits: layer-wise
    return "cpu" if request.param == "layerwise_cpu" else "reference"


@pytest.mark.parametrize("lr_kind", ["float", "scalar", "table", "elem", "step_elem", "mixed_elem"])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("activation,loss", [("relu", "mse"), ("tanh", "cross_entropy"), ("tanh", "mse"),
                                             ("relu", "cross_entropy")])
def test_matches_reference_float64(path, lr_kind, first_order, activation, loss):
    check([3, 9, 7, 4], 3, 5, 6, 3, lr_kind=lr_kind, first_order=first_order, activation=activation, loss=loss,
          msl=lr_kind in ("table", "step_elem"), backend=path)


@pytest.mark.parametrize("case", [
    dict(dims=[1, 40, 40, 1], T=4, Ns=10, Nq=10, K=5),          # sinusoid
    dict(dims=[2, 5], T=1, Ns=1, Nq=3, K=1),                     # one layer, T = 1, K = 1, one point
    dict(dims=[5, 19, 13, 11, 3], T=2, Ns=13, Nq=7, K=2),        # odd widths, N not a multiple of a tile
    dict(dims=[4, 33, 17, 9], T=3, Ns=17, Nq=9, K=4, msl=True),
], ids=["sinusoid", "tiny", "odd", "msl"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_shapes(path, case, dtype):
    case = dict(case)
    check(case.pop("dims"), case.pop("T"), case.pop("Ns"), case.pop("Nq"), case.pop("K"), dtype=dtype,
          lr_kind="scalar", backend=path, **case)


def test_fused_limit_boundary(monkeypatch):
    """At the limit the fused kernel runs; one byte below it the layer-wise path does; same numbers."""
    dims, T, Ns, Nq, K = [3, 24, 24, 2], 2, 7, 5, 2
    need = MM.fused_workspace_bytes(dims, K, Ns, Nq, torch.float64, lr_learned=True)
    calls = []
    real = MM._run_fused
    monkeypatch.setattr(MM, "_run_fused", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(MM, "FUSED_CPU_MAX_WORKSPACE_BYTES", need)
    assert MM.fits_fused(dims, K, Ns, Nq, dtype=torch.float64, lr_learned=True)[0]
    _, g_fused = check(dims, T, Ns, Nq, K, lr_kind="table")
    assert calls == [1]
    monkeypatch.setattr(MM, "FUSED_CPU_MAX_WORKSPACE_BYTES", need - 1)
    ok, why = MM.fits_fused(dims, K, Ns, Nq, dtype=torch.float64, lr_learned=True)
    assert not ok and "exceeds" in why
    _, g_layer = check(dims, T, Ns, Nq, K, lr_kind="table")
    assert calls == [1]
    for a, b in zip(g_fused, g_layer):
        assert_close("fused vs layer-wise", a, b, torch.float64)


@pytest.mark.parametrize("lr_learned,n_msl", [(False, 1), (True, 1), (True, 3), (False, 2)])
def test_workspace_formula_matches_kernel(lr_learned, n_msl):
    C = fastmaml._ext.ext()
    for dims, K, Ns, Nq in [([1, 40, 40, 1], 5, 10, 10), ([3, 7, 2], 3, 4, 9), ([5, 9, 8, 7, 3], 4, 13, 2)]:
        n = min(n_msl, K)
        assert MM.fused_workspace_bytes(dims, K, Ns, Nq, torch.float32, lr_learned=lr_learned, n_msl=n) == \
            4 * C.maml_mlp_workspace_elems(dims, K, Ns, Nq, lr_learned, n)
    # the sinusoid configuration fits an H100's 227 KB of shared memory per block
    assert MM.fused_workspace_bytes([1, 40, 40, 1], 5, 10, 10, torch.float32) <= 227 * 1024 - 128 * 8


def test_wide_model_past_default_limit_uses_layerwise():
    dims = [64, 512, 512, 5]  # ~1.6 MB of parameters per copy: past the 4 MiB workspace
    ok, why = maml_mlp.supports(dims, "relu", steps=5, n_support=5, n_query=15)
    assert not ok and "exceeds" in why
    check([64, 512, 512, 5], 2, 5, 4, 2, loss="cross_entropy", lr_kind="scalar", dtype=torch.float32)


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
    assert_close("no-grad meta-loss", m, r, torch.float64)


def test_upstream_gradient_is_applied():
    ws, bs, xs, ys, xq, yq = problem([2, 8, 3], 3, 4, 4, "mse", torch.float64)
    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    m = maml_mlp(ws, bs, xs, ys, xq, yq, lr, steps=2, backend="cpu")
    g1 = torch.autograd.grad(3.5 * m, ws + bs + [lr])
    m = maml_mlp(ws, bs, xs, ys, xq, yq, lr, steps=2, backend="cpu")
    g2 = torch.autograd.grad(m, ws + bs + [lr])
    for a, b in zip(g1, g2):
        assert_close("scaled grad", a, 3.5 * b, torch.float64)


def test_double_backward_raises():
    ws, bs, xs, ys, xq, yq = problem([2, 8, 3], 2, 4, 4, "mse", torch.float64)
    m = maml_mlp(ws, bs, xs, ys, xq, yq, 0.1, steps=2, backend="cpu")
    with pytest.raises(RuntimeError, match="maml_mlp is once-differentiable"):
        torch.autograd.grad(m, ws, create_graph=True)


def test_supports():
    seq = torch.nn.Sequential(torch.nn.Linear(1, 40), torch.nn.ReLU(), torch.nn.Linear(40, 40), torch.nn.ReLU(),
                              torch.nn.Linear(40, 1))
    assert maml_mlp.supports(seq)[0]
    assert maml_mlp.supports(seq, "relu", "mse")[0]
    ok, why = maml_mlp.supports(seq, "tanh")
    assert not ok and "does not match" in why
    ok, why = maml_mlp.supports(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.GELU(), torch.nn.Linear(4, 1)))
    assert not ok and "GELU" in why
    ok, why = maml_mlp.supports(torch.nn.Sequential(torch.nn.Linear(3, 4, bias=False)))
    assert not ok and "without bias" in why
    ok, why = maml_mlp.supports(torch.nn.Conv2d(1, 1, 3))
    assert not ok and "Conv2d" in why
    ok, why = maml_mlp.supports([2] * 10)
    assert not ok and "9 layers" in why
    assert MM.fused_limits("cpu")["max_workspace_bytes"] == MM.FUSED_CPU_MAX_WORKSPACE_BYTES


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
    assert_close("cuda meta-loss", m.detach().cpu(), r.detach(), dtype)
    for a, b in zip(g, gr):
        assert_close("cuda grad", a.cpu(), b, dtype)
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
