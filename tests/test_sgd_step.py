"""``fastmaml.ops.sgd_step`` on every backend against the reference and against an
independent per-task float64 computation; the reference against gradcheck; torch.func
transforms; bad inputs; the multi-tensor chunk tables of the CUDA launcher."""

from __future__ import annotations

import importlib
import random
import zlib

import pytest
import torch

from fastmaml import _ext, backends
from fastmaml import reference as ref
from fastmaml.ops import sgd_step

op_module = importlib.import_module("fastmaml.ops.sgd_step")
triton_module = importlib.import_module("fastmaml.triton.sgd_step")

LR_KINDS = ("float", "scalar", "per_tensor", "per_element")
THETA_MODES = ("shared", "per_task", "mixed")
EPS = {torch.float32: torch.finfo(torch.float32).eps, torch.float64: torch.finfo(torch.float64).eps}


# ---- helpers -----------------------------------------------------------------------


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: torch.Tensor | float, what: str) -> None:
    """Elementwise |actual − expected| <= tol; on failure report the worst element."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.double() - expected.double()).abs()
    tol_t = torch.as_tensor(tol, dtype=torch.float64).expand_as(err) if err.dim() else torch.as_tensor(tol, dtype=torch.float64)
    bad = err > tol_t
    if bool(bad.any()):
        k = int(torch.argmax(err - tol_t).item()) if err.dim() else 0
        idx = tuple(int(x) for x in torch.unravel_index(torch.tensor(k), err.shape)) if err.dim() else ()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.numel()} elements off; worst at {idx}: "
            f"got {actual.reshape(-1)[k].item()!r}, expected {expected.reshape(-1)[k].item()!r}, "
            f"error {err.reshape(-1)[k].item():.3e} > tol {tol_t.reshape(-1)[k].item():.3e}"
        )


def elem_tol(dtype: torch.dtype, magnitude: torch.Tensor) -> torch.Tensor:
    """Tolerance of a result whose terms have absolute sum `magnitude` (float64: at
    most 1e-12 on these sizes; float32: a few roundings of the terms)."""
    if dtype == torch.float64:
        return torch.full_like(magnitude.double(), 1e-12)
    return 8 * EPS[dtype] * magnitude.double() + 1e-30


def random_shapes(rng: random.Random, n: int) -> list[tuple[int, ...]]:
    pool = [(1,), (7,), (5, 3), (2, 3, 3), (300,), (17, 19), (1, 1), (257,), (3, 1, 2, 2)]
    return [rng.choice(pool) for _ in range(n)]


def make_case(seed: int, dtype: torch.dtype, T: int, lr_kind: str, theta_mode: str, device="cpu", n: int | None = None):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    n = n or rng.randint(1, 5)
    shapes = random_shapes(rng, n)
    shared = [theta_mode == "shared" or (theta_mode == "mixed" and i % 2 == 0) for i in range(n)]
    params = [torch.randn(s if sh else (T, *s), generator=gen, dtype=dtype).to(device) for s, sh in zip(shapes, shared)]
    grads = [torch.randn((T, *s), generator=gen, dtype=dtype).to(device) for s in shapes]
    if lr_kind == "float":
        lr = 0.37
    elif lr_kind == "scalar":
        lr = torch.tensor(0.37, dtype=dtype).to(device)
    elif lr_kind == "per_tensor":
        lr = torch.rand(n, generator=gen, dtype=dtype).to(device)
    else:
        lr = [torch.rand(s, generator=gen, dtype=dtype).to(device) for s in shapes]
    return params, grads, lr, shapes, shared


def lr_tensors(lr) -> list[torch.Tensor]:
    if isinstance(lr, float):
        return []
    return [lr] if isinstance(lr, torch.Tensor) else list(lr)


def alpha_of(lr, i: int):
    if isinstance(lr, float):
        return lr
    if isinstance(lr, torch.Tensor):
        return lr if lr.dim() == 0 else lr[i]
    return lr[i]


def independent(params, grads, lr, v, shared):
    """Per-task loops in float64, written without the reference's broadcasting."""
    T = grads[0].shape[0]
    out, dtheta, dgrad, dlr_terms, mags = [], [], [], [], []
    for i, (p, g) in enumerate(zip(params, grads)):
        a = alpha_of(lr, i)
        a = a.double() if isinstance(a, torch.Tensor) else a
        p, g, vi = p.double(), g.double(), v[i].double()
        out.append(torch.stack([(p if shared[i] else p[t]) - a * g[t] for t in range(T)]))
        if shared[i]:
            acc = torch.zeros_like(p)
            mag = torch.zeros_like(p)
            for t in range(T):
                acc = acc + vi[t]
                mag = mag + vi[t].abs()
            dtheta.append((acc, mag))
        else:
            dtheta.append((vi, vi.abs()))
        dgrad.append(torch.stack([-a * vi[t] for t in range(T)]))
        gv = torch.zeros_like(g[0])
        gv_mag = torch.zeros_like(g[0])
        for t in range(T):
            gv = gv - g[t] * vi[t]
            gv_mag = gv_mag + (g[t] * vi[t]).abs()
        dlr_terms.append(gv)
        mags.append(gv_mag)
    if isinstance(lr, float):
        dlr = None
    elif isinstance(lr, torch.Tensor) and lr.dim() == 0:
        dlr = (sum(x.sum() for x in dlr_terms), sum(m.sum() for m in mags))
    elif isinstance(lr, torch.Tensor):
        dlr = (torch.stack([x.sum() for x in dlr_terms]), torch.stack([m.sum() for m in mags]))
    else:
        dlr = list(zip(dlr_terms, mags))
    return out, dtheta, dgrad, dlr


def check_backend(backend, dtype, T, lr_kind, theta_mode, seed, device="cpu"):
    params, grads, lr, shapes, shared = make_case(seed, dtype, T, lr_kind, theta_mode, device)
    before = [t.clone() for t in params + grads + lr_tensors(lr)]
    # forward, without autograd (the lean path)
    out = sgd_step(params, grads, lr, backend=backend)
    expect = ref.sgd_step(params, grads, lr)
    v = [torch.randn_like(o) for o in out]
    ind_out, ind_dth, ind_dg, ind_dlr = independent(params, grads, lr, v, shared)
    for i in range(len(out)):
        assert out[i].dtype == dtype and out[i].device.type == torch.device(device).type
        a = alpha_of(lr, i)
        a = a.double() if isinstance(a, torch.Tensor) else a
        mag = params[i].double().abs() + (a * grads[i].double()).abs()  # |θ| + |α·g|
        tol = elem_tol(dtype, mag.expand_as(ind_out[i]))
        assert_close(out[i], ind_out[i], tol, f"{backend} out[{i}] vs independent")
        assert_close(out[i], expect[i], tol, f"{backend} out[{i}] vs reference")
    # backward through autograd
    P = [p.clone().requires_grad_() for p in params]
    G = [g.clone().requires_grad_() for g in grads]
    L = lr if isinstance(lr, float) else (lr.clone().requires_grad_() if isinstance(lr, torch.Tensor) else [a.clone().requires_grad_() for a in lr])
    o = sgd_step(P, G, L, backend=backend)
    for i in range(len(o)):
        assert_close(o[i].detach(), ind_out[i], elem_tol(dtype, ind_out[i].abs() + 1), f"{backend} out[{i}] (autograd)")
    d = torch.autograd.grad(o, P + G + lr_tensors(L), v)
    # the reference's autograd must meet the same bounds (so backend ≈ reference too)
    d_ref = torch.autograd.grad(ref.sgd_step(P, G, L), P + G + lr_tensors(L), v)
    n = len(params)
    for who, dd in ((backend, d), ("reference autograd", d_ref)):
        for i in range(n):
            acc, mag = ind_dth[i]
            assert_close(dd[i], acc, elem_tol(dtype, mag), f"{who} dparams[{i}]")
            assert_close(dd[n + i], ind_dg[i], elem_tol(dtype, ind_dg[i].abs()), f"{who} dgrads[{i}]")
        if ind_dlr is not None:
            got = dd[2 * n :]
            if isinstance(ind_dlr, list):
                for i, (x, mag) in enumerate(ind_dlr):
                    assert_close(got[i], x, elem_tol(dtype, mag), f"{who} dlr[{i}]")
            else:
                x, mag = ind_dlr
                assert_close(got[0], x, elem_tol(dtype, mag), f"{who} dlr")
    for a, b in zip(before, params + grads + lr_tensors(lr)):
        assert torch.equal(a, b), "inputs were modified"


# ---- the reference -------------------------------------------------------------------


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

CPU_BACKENDS = ["reference", "cpu", "triton"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("lr_kind", LR_KINDS)
@pytest.mark.parametrize("theta_mode", THETA_MODES)
@pytest.mark.parametrize("T", [1, 3])
def test_backend_matches(backend, dtype, lr_kind, theta_mode, T):
    seed = zlib.crc32(f"{backend}/{dtype}/{lr_kind}/{theta_mode}/{T}".encode()) % 10_000  # stable across runs
    check_backend(backend, dtype, T, lr_kind, theta_mode, seed)


def test_triton_kernels_really_run(monkeypatch):
    """Under TRITON_INTERPRET=1 (set by conftest without a GPU) the triton backend is
    available and its kernels execute: count the launches."""
    assert backends.status("triton").available, backends.status("triton").reason
    calls = []
    for name in ("_sgd_step_fwd_kernel", "_sgd_step_bwd_kernel", "_sum_partials_kernel"):
        kern = getattr(triton_module, name)

        class Spy:
            def __init__(self, k, nm):
                self.k, self.nm = k, nm

            def __getitem__(self, grid):
                calls.append(self.nm)
                return self.k[grid]

        monkeypatch.setattr(triton_module, name, Spy(kern, name))
    p = [torch.randn(5), torch.randn(3, 2)]
    g = [torch.randn(2, 5), torch.randn(2, 3, 2)]
    lr = torch.tensor(0.1, requires_grad=True)
    out = sgd_step(p, g, lr, backend="triton")
    torch.autograd.grad(out, [lr], [torch.ones_like(o) for o in out])
    assert calls == ["_sgd_step_fwd_kernel", "_sgd_step_bwd_kernel", "_sum_partials_kernel"]


def test_cpu_parallel_path_and_determinism():
    """Big enough for the OpenMP region (T·N >= 2^16); dα is bitwise reproducible."""
    for dtype in (torch.float32, torch.float64):
        check_backend("cpu", dtype, 6, "scalar", "mixed", 11)
        gen = torch.Generator().manual_seed(0)
        p = [torch.randn(70_001, generator=gen, dtype=dtype), torch.randn(33, generator=gen, dtype=dtype)]
        g = [torch.randn(4, 70_001, generator=gen, dtype=dtype), torch.randn(4, 33, generator=gen, dtype=dtype)]
        lr = torch.tensor(0.5, dtype=dtype, requires_grad=True)
        v = [torch.randn(4, 70_001, generator=gen, dtype=dtype), torch.randn(4, 33, generator=gen, dtype=dtype)]
        runs = [torch.autograd.grad(sgd_step(p, g, lr, backend="cpu"), [lr], v)[0] for _ in range(3)]
        assert all(torch.equal(runs[0], r) for r in runs[1:])
        ind = -sum((gi.double() * vi.double()).sum() for gi, vi in zip(g, v))
        mag = sum((gi.double() * vi.double()).abs().sum() for gi, vi in zip(g, v))
        assert_close(runs[0], ind, elem_tol(dtype, mag), "dlr (parallel path)")
        out = sgd_step(p, g, 0.25, backend="cpu")
        assert_close(out[0], p[0].double() - 0.25 * g[0].double(), elem_tol(dtype, p[0].abs() + g[0].abs()), "out (parallel)")


def test_partial_requires_grad_and_empty_tensor():
    """Only some inputs need a gradient; a zero-element tensor is allowed."""
    p = [torch.randn(4, 0), torch.randn(3)]
    g = [torch.randn(2, 4, 0), torch.randn(2, 3, requires_grad=True)]
    lr = torch.rand(2, requires_grad=True)
    for backend in CPU_BACKENDS:
        out = sgd_step(p, g, lr, backend=backend)
        assert out[0].shape == (2, 4, 0)
        v = [torch.ones(2, 4, 0), torch.ones(2, 3)]
        dg, dlr = torch.autograd.grad(out, [g[1], lr], v)
        assert_close(dg, -lr[1].detach() * torch.ones(2, 3), 1e-6, f"{backend} dg")
        assert_close(dlr, torch.stack([torch.tensor(0.0), -g[1].detach().sum()]), 1e-5, f"{backend} dlr")


def test_saves_grads_only_when_lr_needs_a_gradient():
    """The backward keeps the T-task gradients alive only to compute dα."""
    P = [torch.randn(3, requires_grad=True), torch.randn(2, 2, requires_grad=True)]
    G = [torch.randn(4, 3, requires_grad=True), torch.randn(4, 2, 2)]
    for lr, expect in [(0.1, 0), (torch.tensor(0.1), 1), (torch.tensor(0.1, requires_grad=True), 3)]:
        out = sgd_step(P, G, lr, backend="cpu")
        assert len(out[0].grad_fn.saved_tensors) == expect


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_double_backward_matches_reference(backend):
    params, grads, lr, _, _ = make_case(5, torch.float64, 2, "per_element", "mixed", n=3)
    P = [p.requires_grad_() for p in params]
    G = [g.requires_grad_() for g in grads]
    L = [a.requires_grad_() for a in lr]

    def second(fn):
        out = fn(P, G, L)
        loss = sum((o**2).sum() for o in out)
        d = torch.autograd.grad(loss, P + G + L, create_graph=True)
        return torch.autograd.grad(sum((x**2).sum() for x in d), P + G + L)

    for a, b in zip(second(lambda p, g, l: sgd_step(p, g, l, backend=backend)), second(ref.sgd_step)):
        assert_close(a, b, 1e-12 * (1 + b.abs()), "double backward")


# ---- torch.func ----------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_torch_func_grad_vjp_vmap(backend):
    torch.manual_seed(0)
    T = 3
    p = [torch.randn(4, 3, dtype=torch.float64), torch.randn(T, 5, dtype=torch.float64)]
    g = [torch.randn(T, 4, 3, dtype=torch.float64), torch.randn(T, 5, dtype=torch.float64)]
    lr = torch.tensor([0.1, 0.3], dtype=torch.float64)

    def loss(fn, p, g, lr):
        return sum((o.sin() ** 2).sum() for o in fn(p, g, lr))

    fast = lambda p, g, lr: sgd_step(p, g, lr, backend=backend)  # noqa: E731
    got = torch.func.grad(lambda p, g, lr: loss(fast, p, g, lr), argnums=(0, 1, 2))(p, g, lr)
    exp = torch.func.grad(lambda p, g, lr: loss(ref.sgd_step, p, g, lr), argnums=(0, 1, 2))(p, g, lr)
    for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(exp)):
        assert_close(a, b, 1e-12, "torch.func.grad")

    out, vjp_fn = torch.func.vjp(fast, p, g, lr)
    out_r, vjp_r = torch.func.vjp(ref.sgd_step, p, g, lr)
    cot = [torch.randn_like(o) for o in out]
    for a, b in zip(torch.utils._pytree.tree_leaves(vjp_fn(cot)), torch.utils._pytree.tree_leaves(vjp_r(cot))):
        assert_close(a, b, 1e-12, "torch.func.vjp")

    # vmap over a batch of meta-batches: grads batched (folds into T), then also lr batched
    B = 2
    gb = [torch.randn(B, *x.shape, dtype=torch.float64) for x in g]
    lrb = torch.rand(B, 2, dtype=torch.float64)
    for in_dims, args in [((None, 0, None), (p, gb, lr)), ((None, 0, 0), (p, gb, lrb)), ((0, 0, None), ([torch.randn(B, *x.shape, dtype=torch.float64) for x in p], gb, lr))]:
        a = torch.func.vmap(fast, in_dims=in_dims)(*args)
        b = torch.func.vmap(ref.sgd_step, in_dims=in_dims)(*args)
        for x, y in zip(a, b):
            assert_close(x, y, 1e-12, f"vmap {in_dims}")
    # per-example gradients: vmap of grad
    per = torch.func.vmap(torch.func.grad(lambda g, lr: loss(fast, p, g, lr), argnums=(0, 1)), in_dims=(0, None))(gb, lr)
    per_r = torch.func.vmap(torch.func.grad(lambda g, lr: loss(ref.sgd_step, p, g, lr), argnums=(0, 1)), in_dims=(0, None))(gb, lr)
    for a, b in zip(torch.utils._pytree.tree_leaves(per), torch.utils._pytree.tree_leaves(per_r)):
        assert_close(a, b, 1e-12, "vmap(grad)")


# ---- bad inputs ----------------------------------------------------------------------


def _good(dtype=torch.float32):
    return [torch.randn(3, dtype=dtype), torch.randn(2, 2, dtype=dtype)], [torch.randn(4, 3, dtype=dtype), torch.randn(4, 2, 2, dtype=dtype)]


def _bad_cases():
    p, g = _good()
    base = torch.randn(4, 3)
    shared_buf = torch.randn(100)
    cases = [
        ("params not a list", (p[0], g, 0.1), TypeError, "params must be a list"),
        ("grads length", (p, g[:1], 0.1), ValueError, "grads must hold one tensor per params"),
        ("empty", ([], [], 0.1), ValueError, "at least 1"),
        ("non-tensor", ([p[0], 3.0], g, 0.1), TypeError, r"params\[1\] must be a torch.Tensor"),
        ("int dtype", (p, [g[0].long(), g[1]], 0.1), TypeError, r"grads\[0\] must be float32 or float64"),
        ("half dtype", ([p[0].half(), p[1]], g, 0.1), TypeError, r"params\[0\] must be float32 or float64"),
        ("mixed dtype", ([p[0], p[1].double()], g, 0.1), TypeError, r"params\[1\] must have dtype torch.float32"),
        ("device mix", ([p[0], torch.empty(2, 2, device="meta")], g, 0.1), ValueError, r"params\[1\] must be on cpu"),
        ("non-contiguous", (p, [g[0], torch.randn(4, 2, 2).transpose(1, 2)], 0.1), ValueError, r"grads\[1\] must be contiguous"),
        ("non-contiguous params", ([torch.randn(3, 2)[:, 0], p[1]], g, 0.1), ValueError, r"params\[0\] must be contiguous"),
        ("mismatched T", (p, [g[0], torch.randn(5, 2, 2)], 0.1), ValueError, r"grads\[1\] must have shape \[T, \*shape\] with T = 4"),
        ("mismatched shape", ([torch.randn(4), p[1]], g, 0.1), ValueError, r"params\[0\] must have shape \(3,\)"),
        ("T = 0", ([torch.randn(3)], [torch.randn(0, 3)], 0.1), ValueError, "T = 0"),
        ("0-d grad", ([torch.randn(())], [torch.randn(())], 0.1), ValueError, r"grads\[0\] must have a leading task dimension"),
        ("grads alias params", ([base], [base], 0.1), ValueError, "overlap"),
        ("grads overlap each other", ([p[0], p[0] + 1], [shared_buf[:12].view(4, 3), shared_buf[6:18].view(4, 3)], 0.1), ValueError, "overlap"),
        ("lr overlaps params", (p, g, [p[0], torch.randn(2, 2)]), ValueError, "overlap"),
        ("lr wrong length", (p, g, torch.rand(3)), ValueError, r"lr as a tensor must be 0-d .* \(2,\)"),
        ("lr 2-d", (p, g, torch.rand(2, 2)), ValueError, "lr as a tensor"),
        ("lr list length", (p, g, [torch.rand(3)]), ValueError, "lr as a list"),
        ("lr element shape", (p, g, [torch.rand(3), torch.rand(4)]), ValueError, r"lr\[1\] must have shape \(2, 2\)"),
        ("lr int tensor", (p, g, torch.tensor(1)), TypeError, "lr must be a floating-point tensor"),
        ("lr dtype", (p, g, torch.tensor(0.1, dtype=torch.float64)), TypeError, "lr must have dtype torch.float32"),
        ("lr type", (p, g, "0.1"), TypeError, "lr must be a float"),
        ("lr bool", (p, g, True), TypeError, "lr must be a float"),
    ]
    return cases


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_inputs(backend, case):
    _, args, exc, match = case
    with pytest.raises(exc, match=match):
        sgd_step(*args, backend=backend)


def test_unknown_backend():
    p, g = _good()
    with pytest.raises(ValueError, match="backend must be one of"):
        sgd_step(p, g, 0.1, backend="tpu")


# ---- out= (caller-provided outputs) -----------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("lr_kind", LR_KINDS)
@pytest.mark.parametrize("theta_mode", THETA_MODES)
def test_out_matches_new_outputs(backend, dtype, lr_kind, theta_mode):
    """out= writes the same values as the allocating call, into the given tensors
    (returned as the same objects), overwriting every element and nothing else."""
    seed = zlib.crc32(f"out/{backend}/{dtype}/{lr_kind}/{theta_mode}".encode()) % 10_000
    params, grads, lr, shapes, shared = make_case(seed, dtype, 3, lr_kind, theta_mode, n=4)
    before = [t.clone() for t in params + grads + lr_tensors(lr)]
    with torch.no_grad():
        want = sgd_step(params, grads, lr, backend=backend)
        # NaN-filled buffers: an element left unwritten would show
        out = [torch.full_like(g, float("nan")) for g in grads]
        got = sgd_step(params, grads, lr, backend=backend, out=out)
    assert isinstance(got, list) and len(got) == len(out)
    assert all(a is b for a, b in zip(got, out))
    expect = ref.sgd_step(params, grads, lr)
    for i in range(len(out)):
        assert torch.equal(out[i], want[i]), f"{backend} out[{i}] differs from the allocating call"
        a = alpha_of(lr, i)
        a = a.double() if isinstance(a, torch.Tensor) else a
        tol = elem_tol(dtype, (params[i].double().abs() + (a * grads[i].double()).abs()).expand_as(out[i]))
        assert_close(out[i], expect[i], tol, f"{backend} out[{i}] vs reference")
    for a, b in zip(before, params + grads + lr_tensors(lr)):
        assert torch.equal(a, b), "inputs were modified"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_out_buffers_reused_across_calls(backend):
    """A K-step inner loop that ping-pongs two buffer sets gives the allocating loop's
    results; out without torch.no_grad() works when nothing requires grad."""
    gen = torch.Generator().manual_seed(7)
    T = 5
    shapes = [(40, 1), (40,), (40, 40), (1,)]
    theta = [torch.randn(s, generator=gen) for s in shapes]
    gs = [[torch.randn(T, *s, generator=gen) for s in shapes] for _ in range(4)]
    bufs = [[torch.empty(T, *s) for s in shapes] for _ in range(2)]
    cur_new, cur_out = theta, theta
    for k, g in enumerate(gs):
        cur_new = sgd_step(cur_new, g, 0.1, backend=backend)
        res = sgd_step(cur_out, g, 0.1, backend=backend, out=bufs[k % 2])
        assert all(r is b for r, b in zip(res, bufs[k % 2]))
        cur_out = res
        for i in range(len(shapes)):
            assert torch.equal(cur_out[i], cur_new[i]), f"step {k}, tensor {i}"


def _spy_lean(monkeypatch) -> list[bool]:
    """Record, per sgd_step call, whether the lean CPU entry took it (True) or declined."""
    calls: list[bool] = []
    real = op_module._lean_cpu_forward

    def spy(*args):
        res = real(*args)
        calls.append(res is not None)
        return res

    monkeypatch.setattr(op_module, "_lean_cpu_forward", spy)
    return calls


def test_out_large_outputs_take_the_lean_path(monkeypatch):
    """Outputs of 1 MiB or more: the lean entry writes into out too (no allocation to
    decline for), and the result equals the allocating call's."""
    calls = _spy_lean(monkeypatch)
    p, g = [torch.randn(70_000), torch.randn(5)], [torch.randn(4, 70_000), torch.randn(4, 5)]
    out = [torch.empty_like(x) for x in g]
    with torch.no_grad():
        got = sgd_step(p, g, 0.1, backend="cpu", out=out)
        want = sgd_step(p, g, 0.1, backend="cpu")
    assert calls == [True, False]
    assert got[0] is out[0] and torch.equal(out[0], want[0]) and torch.equal(out[1], want[1])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_out_bumps_version_counter(backend):
    """The kernels write through pointers; out's version counter moves as an in-place
    op's would, so autograd notices a saved tensor being overwritten."""
    p, g = [torch.randn(3)], [torch.randn(2, 3)]
    out = [torch.empty(2, 3)]
    w = torch.randn(2, 3, requires_grad=True)
    y = (w * out[0]).sum()  # saves out[0] for backward
    v0 = out[0]._version
    with torch.no_grad():
        sgd_step(p, g, 0.1, backend=backend, out=out)
    assert out[0]._version > v0
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def _bad_out_cases():
    p, g = _good()
    o = [torch.empty(4, 3), torch.empty(4, 2, 2)]
    pt = [torch.randn(4, 3), p[1]]  # params[0] per task: the shape of out[0]
    buf = torch.rand(100)
    shared_in_out = [buf[:3], p[1]]  # shared params[0] lies inside out[0] below
    lr_buf = torch.rand(16)
    lr_el = [torch.rand(3), lr_buf[:4].view(2, 2)]  # per-element lr[1] lies inside out[1] below
    p2, g2 = [torch.randn(3), torch.randn(3)], [torch.randn(4, 3), torch.randn(4, 3)]
    same = torch.empty(4, 3)
    return [
        ("not a list", (p, g, 0.1), o[0], TypeError, "out must be a list or tuple of 2 tensors"),
        ("wrong length", (p, g, 0.1), o[:1], ValueError, r"out must hold one tensor per params entry: expected 2, got 1"),
        ("non-tensor", (p, g, 0.1), [o[0], 3.0], TypeError, r"out\[1\] must be a torch.Tensor, got float"),
        ("shape", (p, g, 0.1), [o[0], torch.empty(4, 4)], ValueError, r"out\[1\] must have shape \(4, 2, 2\) like grads\[1\].*got \(4, 4\)"),
        ("params shape", (p, g, 0.1), [torch.empty(3), o[1]], ValueError, r"out\[0\] must have shape \(4, 3\).*got \(3,\)"),
        ("dtype", (p, g, 0.1), [o[0], torch.empty(4, 2, 2, dtype=torch.float64)], TypeError, r"out\[1\] must have dtype torch.float32 like grads, got torch.float64"),
        ("device", (p, g, 0.1), [o[0], torch.empty(4, 2, 2, device="meta")], ValueError, r"out\[1\] must be on cpu like grads, got meta"),
        ("non-contiguous", (p, g, 0.1), [o[0], torch.empty(4, 2, 2).transpose(1, 2)], ValueError, r"out\[1\] must be contiguous"),
        ("is params (per task)", (pt, g, 0.1), [pt[0], o[1]], ValueError, r"out\[0\] overlaps params\[0\].*in-place out=params is not supported"),
        ("overlaps shared params", (shared_in_out, g, 0.1), [buf[:12].view(4, 3), o[1]], ValueError, r"out\[0\] overlaps params\[0\]"),
        ("is grads", (p, g, 0.1), [g[0], o[1]], ValueError, r"out\[0\] overlaps grads\[0\]"),
        ("overlaps lr element", (p, g, lr_el), [o[0], lr_buf.view(4, 2, 2)], ValueError, r"out\[1\] overlaps lr\[1\]"),
        ("overlaps 0-d lr", (p, g, buf[50]), [o[0], buf[48:64].view(4, 2, 2)], ValueError, r"out\[1\] overlaps lr\b"),
        ("overlaps another out", (p, g, 0.1), [buf[:12].view(4, 3), buf[8:24].view(4, 2, 2)], ValueError, r"out\[[01]\] overlaps out\[[01]\]"),
        ("same tensor twice", (p2, g2, 0.1), [same, same], ValueError, r"out\[[01]\] overlaps out\[[01]\]"),
    ]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("lr_as", ["as given", "tensor"])
@pytest.mark.parametrize("case", _bad_out_cases(), ids=lambda c: c[0])
def test_bad_out(backend, lr_as, case):
    """Every bad out raises naming out[i]; with a float lr the CPU backend declines in
    the lean entry first (the C++ kernel raises the overlaps), with a 0-d tensor lr the
    general path checks. Nothing but out is written."""
    _, (params, grads, lr), out, exc, match = case
    if lr_as == "tensor" and isinstance(lr, float):
        lr = torch.tensor(lr)
    before = [t.clone() for t in list(params) + list(grads) + lr_tensors(lr)]
    with torch.no_grad(), pytest.raises(exc, match=match):
        sgd_step(params, grads, lr, backend=backend, out=out)
    for a, b in zip(before, list(params) + list(grads) + lr_tensors(lr)):
        assert torch.equal(a, b), "an input was modified"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("who", ["params", "grads", "lr", "out"])
def test_out_refuses_autograd(backend, who):
    """Like torch's out=, not differentiable: refused under grad mode when any input or
    out requires grad; under torch.no_grad() it is plain data."""
    p, g = _good()
    lr = torch.tensor(0.1)
    out = [torch.empty(4, 3), torch.empty(4, 2, 2)]
    {"params": p[0], "grads": g[1], "lr": lr, "out": out[1]}[who].requires_grad_()
    with pytest.raises(RuntimeError, match="out= does not support automatic differentiation.*without out="):
        sgd_step(p, g, lr, backend=backend, out=out)
    if who != "lr":  # float lr: the lean entry declines first
        with pytest.raises(RuntimeError, match="out= does not support automatic differentiation"):
            sgd_step(p, g, 0.1, backend=backend, out=out)
    with torch.no_grad():
        res = sgd_step(p, g, lr, backend=backend, out=out)
    assert res[1] is out[1]
    assert_close(out[1].detach(), (p[1] - lr * g[1]).detach(), 1e-6, "out under no_grad")


def test_out_refused_under_torch_func():
    p, g = _good(torch.float64)
    out = [torch.empty(4, 3, dtype=torch.float64), torch.empty(4, 2, 2, dtype=torch.float64)]

    def f(p0):
        return sgd_step([p0, p[1]], g, 0.1, backend="cpu", out=out)[0].sum()

    with pytest.raises(RuntimeError, match="out= is not supported inside torch.func transforms"):
        torch.func.grad(f)(p[0])
    with pytest.raises(RuntimeError, match="out= is not supported inside torch.func transforms"):
        torch.func.vmap(lambda gg: sgd_step(p, [gg, g[1]], 0.1, out=out)[0])(torch.randn(2, 4, 3, dtype=torch.float64))


def test_cpp_forward_checks_outputs_overlap():
    """The C++ check covers outputs too: against every input and each other."""
    C = _ext.ext()
    p, g, o = torch.randn(3), torch.randn(2, 3), torch.empty(2, 3)
    C.sgd_step_fwd_cpu([p.data_ptr()], [g.data_ptr()], [o.data_ptr()], [3], [1], 2, 0, 0, 0.1, [])
    with pytest.raises(ValueError, match=r"out\[0\] overlaps grads\[0\]"):
        C.sgd_step_fwd_cpu([p.data_ptr()], [g.data_ptr()], [g.data_ptr() + 4], [3], [1], 2, 0, 0, 0.1, [])
    with pytest.raises(ValueError, match=r"out\[0\] overlaps params\[0\]"):
        C.sgd_step_fwd_cpu([p.data_ptr()], [g.data_ptr()], [p.data_ptr()], [3], [1], 2, 0, 0, 0.1, [])
    p2, g2 = torch.randn(2, 3), torch.randn(2, 3)  # tensor 1: per-task θ
    two = ([p.data_ptr(), p2.data_ptr()], [g.data_ptr(), g2.data_ptr()])
    with pytest.raises(ValueError, match=r"out\[[01]\] overlaps out\[[01]\]"):
        C.sgd_step_fwd_cpu(*two, [o.data_ptr(), o.data_ptr() + 8], [3, 3], [1, 0], 2, 0, 0, 0.1, [])
    with pytest.raises(ValueError, match=r"params\[0\] and grads\[0\] overlap"):  # inputs: the old message
        C.sgd_step_fwd_cpu([g.data_ptr()], [g.data_ptr()], [o.data_ptr()], [3], [1], 2, 0, 0, 0.1, [])


# ---- the C++ boundary and the multi-tensor chunk tables ------------------------------


def test_cpp_boundary_rechecks():
    C = _ext.ext()
    with pytest.raises(ValueError, match="null"):
        C.sgd_step_fwd_cpu([0], [0], [0], [3], [1], 2, 0, 0, 0.1, [])
    with pytest.raises(ValueError, match="tasks"):
        C.sgd_step_fwd_cpu([1], [1], [1], [3], [1], 0, 0, 0, 0.1, [])
    with pytest.raises(ValueError, match="dtype"):
        C.sgd_step_fwd_cpu([1], [1], [1], [3], [1], 2, 7, 0, 0.1, [])


def test_cpp_int_lists_are_checked():
    """The bindings read their int lists directly: anything else is a TypeError."""
    C = _ext.ext()
    p, g, o = torch.randn(3), torch.randn(2, 3), torch.empty(2, 3)
    good = ([p.data_ptr()], [g.data_ptr()], [o.data_ptr()], [3], [1], 2, 0, 0, 0.1, [])
    C.sgd_step_fwd_cpu(*good)
    assert_close(o, p - 0.1 * g, 1e-6, "fwd")
    for k, bad, exc in [(0, [float(p.data_ptr())], TypeError), (3, [True], TypeError), (2, o.data_ptr(), TypeError),
                        (4, [2**40], ValueError), (1, [-1], OverflowError)]:
        args = list(good)
        args[k] = bad
        with pytest.raises(exc):
            C.sgd_step_fwd_cpu(*args)


# ---- the lean forward (CPU, Python-float lr, nothing to differentiate) -----------------


def _lean(params, grads, dtype=torch.float32, check_rg=False, lr=0.5):
    code = 1 if dtype is torch.float64 else 0
    return _ext.ext().sgd_step_fwd_cpu_lean(params, grads, dtype, code, check_rg, lr, torch.empty_like, 1 << 20)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lean_entry_matches_reference(dtype):
    gen = torch.Generator().manual_seed(3)
    shapes = [(40, 1), (40,), (40, 40), (1,), (2, 0), (3, 1, 2)]
    params = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    params[2] = torch.randn(5, 40, 40, generator=gen, dtype=dtype)  # one per-task θ
    grads = [torch.randn(5, *s, generator=gen, dtype=dtype) for s in shapes]
    before = [t.clone() for t in params + grads]
    out = _lean(tuple(params), grads, dtype)
    want = ref.sgd_step(params, grads, 0.5)
    assert len(out) == len(want)
    for o, w, g in zip(out, want, grads):
        assert o.shape == g.shape and o.dtype == dtype and o.is_contiguous()
        assert_close(o, w, elem_tol(dtype, w.abs() + 1), "lean out")
    assert all(torch.equal(a, b) for a, b in zip(params + grads, before))  # inputs untouched
    # the outputs are new memory, one block each
    ptrs = {o.untyped_storage().data_ptr() for o in out if o.numel()}
    assert len(ptrs) == sum(1 for o in out if o.numel())
    assert not ptrs & {t.untyped_storage().data_ptr() for t in params + grads}


def test_lean_entry_declines_what_it_does_not_take():
    """Every input the lean entry does not handle returns None (then the general path
    raises its named error or takes the autograd route); nothing is computed."""
    p, g = [torch.randn(3), torch.randn(2, 2)], [torch.randn(4, 3), torch.randn(4, 2, 2)]
    assert _lean(p, g) is not None
    rg = torch.randn(4, 2, 2, requires_grad=True)
    cases = {
        "non-tensor": ([p[0], 3.0], g),
        "numpy array": ([p[0], p[1].numpy()], g),
        "mixed dtype": ([p[0], p[1].double()], g),
        "other device": ([p[0], torch.empty(2, 2, device="meta")], g),
        "non-contiguous grad": (p, [g[0], torch.randn(4, 2, 2).transpose(1, 2)]),
        "non-contiguous param": ([torch.randn(3, 2)[:, 0], p[1]], g),
        "mismatched T": (p, [g[0], torch.randn(5, 2, 2)]),
        "mismatched shape": ([torch.randn(4), p[1]], g),
        "per-task θ of wrong T": ([p[0], torch.randn(3, 2, 2)], g),
        "T = 0": ([torch.randn(3)], [torch.randn(0, 3)]),
        "0-d grad": ([torch.randn(())], [torch.randn(())]),
        "lengths differ": (p, g[:1]),
        "empty": ([], []),
        "not a list": (p[0], g),
        "requires_grad under grad mode": (p, [g[0], rg]),
        "outputs of 1 MiB or more": ([torch.randn(3), torch.randn(65_536)], [torch.randn(4, 3), torch.randn(4, 65_536)]),
    }
    for name, (pp, gg) in cases.items():
        assert _lean(pp, gg, check_rg=True) is None, name
    # without grad mode a tensor that requires grad is just data
    out = _lean(p, [g[0], rg], check_rg=False)
    assert_close(out[1], (p[1] - 0.5 * rg).detach(), 1e-6, "requires_grad input, no grad mode")
    with pytest.raises(ValueError, match="overlap"):
        _lean([g[0][0]], [g[0]])


def test_lean_entry_out():
    """The lean entry with out: writes into the given tensors (any size) and returns
    them; declines (None, nothing written) whatever out it does not take."""
    C = _ext.ext()
    p, g = [torch.randn(3), torch.randn(2, 2)], [torch.randn(4, 3), torch.randn(4, 2, 2)]

    def lean_out(out, check_rg=True):
        return C.sgd_step_fwd_cpu_lean(p, g, torch.float32, 0, check_rg, 0.5, torch.empty_like, 1 << 20, out)

    out = [torch.full((4, 3), float("nan")), torch.full((4, 2, 2), float("nan"))]
    res = lean_out(tuple(out))
    assert isinstance(res, list) and res[0] is out[0] and res[1] is out[1]
    for o, w in zip(out, ref.sgd_step(p, g, 0.5)):
        assert_close(o, w, 1e-6, "lean out=")
    rg = torch.empty(4, 2, 2, requires_grad=True)
    cases = {
        "not a list": out[0],
        "length": out[:1],
        "non-tensor": [out[0], 1.0],
        "shape": [out[0], torch.empty(4, 4)],
        "dtype": [out[0], torch.empty(4, 2, 2, dtype=torch.float64)],
        "device": [out[0], torch.empty(4, 2, 2, device="meta")],
        "non-contiguous": [out[0], torch.empty(4, 2, 2).transpose(1, 2)],
        "requires_grad under grad mode": [out[0], rg],
    }
    for name, bad in cases.items():
        sentinel = [torch.full((4, 3), 7.0), torch.full((4, 2, 2), 7.0)]
        if isinstance(bad, list) and len(bad) == 2:
            bad = [sentinel[0], bad[1]]
        assert lean_out(bad) is None, name
        assert torch.equal(sentinel[0], torch.full((4, 3), 7.0)), f"{name}: out[0] written before declining"
    assert lean_out([out[0], rg], check_rg=False)[1] is rg  # without grad mode it is plain data
    with pytest.raises(ValueError, match=r"out\[1\] overlaps grads\[1\]"):
        lean_out([out[0], g[1]])


def test_sgd_step_takes_the_lean_path_only_when_it_applies(monkeypatch):
    calls = _spy_lean(monkeypatch)
    p, g = [torch.randn(3), torch.randn(2, 2)], [torch.randn(4, 3), torch.randn(4, 2, 2)]
    with torch.no_grad():
        out = sgd_step(p, g, 0.1, backend="cpu")
    assert calls == [True]
    assert_close(out[1], p[1] - 0.1 * g[1], 1e-6, "lean via sgd_step")
    # a tensor lr, the reference backend, or an input that needs a gradient: general path
    calls.clear()
    sgd_step(p, g, torch.tensor(0.1), backend="cpu")
    assert calls == []
    sgd_step(p, g, 0.1, backend="reference")
    assert calls == [False]
    calls.clear()
    # large outputs: the general path, all of them views of one buffer
    pb, gb = [torch.randn(70_000), torch.randn(5)], [torch.randn(4, 70_000), torch.randn(4, 5)]
    with torch.no_grad():
        out = sgd_step(pb, gb, 0.1, backend="cpu")
    assert calls == [False]
    assert out[0].untyped_storage().data_ptr() == out[1].untyped_storage().data_ptr()
    assert out[1].is_contiguous() and out[1].shape == (4, 5)
    assert_close(out[1], pb[1] - 0.1 * gb[1], 1e-6, "one-buffer output")
    calls.clear()
    pr = [p[0].requires_grad_(), p[1]]
    out = sgd_step(pr, g, 0.1, backend="cpu")
    assert calls == [False] and out[0].requires_grad
    (dp,) = torch.autograd.grad(out[0].sum(), [pr[0]])
    assert torch.equal(dp, torch.full((3,), 4.0))


def test_resolve_fast_path_keeps_the_rules(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("FASTMAML_BACKEND", raising=False)
    assert backends.resolve("cpu", cpu, "sgd_step") == "cpu"
    assert backends.resolve(None, cpu, "sgd_step") == "cpu"
    monkeypatch.setenv("FASTMAML_BACKEND", "reference")
    assert backends.resolve(None, cpu, "sgd_step") == "reference"  # the env var is read on every call
    assert backends.resolve("cpu", cpu, "sgd_step") == "cpu"
    monkeypatch.setattr(_ext, "_C", None)  # the extension "not built"
    with pytest.raises(RuntimeError, match="not available"):
        backends.resolve("cpu", cpu, "sgd_step")
    monkeypatch.delenv("FASTMAML_BACKEND")
    assert backends.resolve(None, cpu, "sgd_step") == "reference"
    p, g = [torch.randn(3)], [torch.randn(2, 3)]
    assert_close(sgd_step(p, g, 0.25)[0], p[0] - 0.25 * g[0], 1e-6, "auto without the extension")


@pytest.mark.skipif(backends.status("cuda").available, reason="checks the no-GPU error path")
def test_cuda_entry_points_raise_without_gpu():
    C = _ext.ext()
    p, g = torch.randn(3), torch.randn(2, 3)
    o = torch.empty(2, 3)
    with pytest.raises(RuntimeError):
        C.sgd_step_fwd_cuda([p.data_ptr()], [g.data_ptr()], [o.data_ptr()], [3], [1], 2, 0, 0, 0.1, [], 0, 0)
    with pytest.raises(RuntimeError):
        C.sgd_step_bwd_cuda([g.data_ptr()], [g.data_ptr()], [3], [1], 2, 0, 0, 0.1, [], [0], [o.data_ptr()], [0], 0, 0)
    with pytest.raises((RuntimeError, ValueError), match="cuda"):
        sgd_step([p], [g], 0.1, backend="cuda")


def _check_plan(cols, rows, cc, rc, mt, mb):
    plan = _ext.ext().multi_tensor_plan(cols, rows, cc, rc, mt, mb)
    seen = []
    expect_first = 0
    for launch in plan["launches"]:
        assert launch["first_block"] == expect_first
        assert 1 <= len(launch["tensors"]) <= mt and 1 <= len(launch["block_slot"]) <= mb
        for b, slot in enumerate(launch["block_slot"]):
            seen.append((launch["tensors"][slot], launch["block_col"][b], launch["block_row"][b], launch["first_block"] + b))
        expect_first += len(launch["block_slot"])
    want = [(i, c, r) for i, n in enumerate(cols) for r in range(-(-rows // rc)) for c in range(-(-n // cc)) if n]
    assert [s[:3] for s in seen] == want  # every chunk exactly once, tensors in order
    assert plan["total_blocks"] == len(want)
    for i, n in enumerate(cols):  # each tensor's blocks are contiguous global numbers
        mine = [s[3] for s in seen if s[0] == i]
        assert len(mine) == plan["tensor_blocks"][i]
        if mine:
            assert mine == list(range(plan["tensor_first_block"][i], plan["tensor_first_block"][i] + len(mine)))
    return plan


def test_multi_tensor_plan_tables():
    rng = random.Random(0)
    for _ in range(30):
        cols = [rng.choice([0, 1, 5, 255, 256, 257, 1000, 4097]) for _ in range(rng.randint(1, 40))]
        _check_plan(cols, rng.randint(1, 40), rng.choice([1, 32, 256]), rng.choice([1, 4, 16]), rng.randint(1, 24), rng.randint(1, 64))
    # the CUDA launcher's own capacities
    mt, mb, threads, rows = _ext.ext().SGD_STEP_CUDA_TABLE
    plan = _check_plan([36864, 64] * 20, 32, threads, rows, mt, mb)
    assert all(len(l["tensors"]) <= mt for l in plan["launches"]) and not plan["needs_index64"]


def test_multi_tensor_plan_64bit_tensors():
    """Planning of tensors past 2^31 elements (no memory is touched): the chunk
    indices stay within int32, the totals are exact and 64-bit indexing is selected
    exactly when some tensor has T·N >= 2^31."""
    C = _ext.ext()
    big = 3_000_000_000
    plan = C.multi_tensor_plan([5, big], 1, 256, 1, 24, 1 << 30)
    assert plan["needs_index64"]
    assert plan["tensor_blocks"] == [1, -(-big // 256)]
    last = plan["launches"][-1]
    assert max(last["block_col"]) == -(-big // 256) - 1
    assert not C.multi_tensor_plan([2**30], 1, 256, 1, 24, 1 << 30)["needs_index64"]
    assert C.multi_tensor_plan([2**30], 2, 256, 1 << 30, 24, 1 << 30)["needs_index64"]  # T·N = 2^31
    assert not C.multi_tensor_plan([2**31 - 1], 1, 1 << 20, 1, 24, 1 << 30)["needs_index64"]


# ---- CUDA (run by the device check) ----------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("lr_kind", LR_KINDS)
@pytest.mark.parametrize("theta_mode", THETA_MODES)
@pytest.mark.parametrize("index64", [False, True])
def test_gpu_backend_matches(backend, dtype, lr_kind, theta_mode, index64, monkeypatch):
    if index64 and backend != "cuda":
        pytest.skip("the 64-bit switch is a CUDA launcher option (Triton offsets are always int64)")
    monkeypatch.setattr(op_module, "FORCE_INDEX64", index64)
    for T in (1, 3, 40):
        check_backend(backend, dtype, T, lr_kind, theta_mode, seed=T, device="cuda")


@pytest.mark.cuda
def test_cuda_many_tensors_flush_and_bitwise_determinism():
    """More tensors than table slots and more blocks than block slots: several launches."""
    gen = torch.Generator().manual_seed(1)
    shapes = [(i % 7 + 1, 300 + i) for i in range(60)] + [(70_000,)]
    p = [torch.randn(s, generator=gen).cuda() for s in shapes]
    g = [torch.randn((5, *s), generator=gen).cuda() for s in shapes]
    lr = torch.tensor(0.2, device="cuda", requires_grad=True)
    out = sgd_step(p, g, lr, backend="cuda")
    for o, e in zip(out, ref.sgd_step(p, g, lr)):
        assert_close(o, e, 1e-6 * (1 + e.abs()), "flush forward")
    v = [torch.randn_like(o) for o in out]
    runs = [torch.autograd.grad(sgd_step(p, g, lr, backend="cuda"), [lr], v)[0] for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    ind = -sum((gi.double() * vi.double()).sum() for gi, vi in zip(g, v))
    mag = sum((gi.double() * vi.double()).abs().sum() for gi, vi in zip(g, v))
    assert_close(runs[0].cpu(), ind.cpu(), float(8 * EPS[torch.float32] * mag), "flush dlr")


@pytest.mark.cuda
def test_cuda_bad_device_mix():
    p = [torch.randn(3, device="cuda")]
    g = [torch.randn(2, 3)]
    with pytest.raises(ValueError, match="must be on"):
        sgd_step(p, g, 0.1)
