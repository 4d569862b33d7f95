"""``fastmaml.ops.sgd_step`` on every backend: beyond the op-vs-twin agreement (the
registry, tests/ops/test_registry.py), the parallel path and determinism, partial
gradients, double backward, torch.func transforms, and the GPU runs (``cuda`` marker)."""

from __future__ import annotations

import pytest
import torch
from helpers import TRITON, assert_close
from sgd_step_cases import CPU_BACKEND_NAMES, EPS, LR_KINDS, THETA_MODES, check_backend, elem_tol, make_case

from fastmaml import reference as ref
from fastmaml.ops import sgd_step
from fastmaml.ops._sgd_step import launch

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
        assert_close("dlr (parallel path)", runs[0], ind, atol=elem_tol(dtype, mag))
        out = sgd_step(p, g, 0.25, backend="cpu")
        assert_close("out (parallel)", out[0], p[0].double() - 0.25 * g[0].double(), atol=elem_tol(dtype, p[0].abs() + g[0].abs()))


def test_partial_requires_grad_and_empty_tensor():
    """Only some inputs need a gradient; a zero-element tensor is allowed."""
    p = [torch.randn(4, 0), torch.randn(3)]
    g = [torch.randn(2, 4, 0), torch.randn(2, 3, requires_grad=True)]
    lr = torch.rand(2, requires_grad=True)
    for backend in CPU_BACKEND_NAMES:
        out = sgd_step(p, g, lr, backend=backend)
        assert out[0].shape == (2, 4, 0)
        v = [torch.ones(2, 4, 0), torch.ones(2, 3)]
        dg, dlr = torch.autograd.grad(out, [g[1], lr], v)
        assert_close(f"{backend} dg", dg, -lr[1].detach() * torch.ones(2, 3), atol=1e-6)
        assert_close(f"{backend} dlr", dlr, torch.stack([torch.tensor(0.0), -g[1].detach().sum()]), atol=1e-5)


def test_saves_grads_only_when_lr_needs_a_gradient():
    """The backward keeps the T-task gradients alive only to compute dα."""
    P = [torch.randn(3, requires_grad=True), torch.randn(2, 2, requires_grad=True)]
    G = [torch.randn(4, 3, requires_grad=True), torch.randn(4, 2, 2)]
    for lr, expect in [(0.1, 0), (torch.tensor(0.1), 1), (torch.tensor(0.1, requires_grad=True), 3)]:
        out = sgd_step(P, G, lr, backend="cpu")
        assert len(out[0].grad_fn.saved_tensors) == expect


@pytest.mark.parametrize("backend", ["cpu", TRITON])
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
        assert_close("double backward", a, b, atol=1e-12 * (1 + b.abs()))


# ---- torch.func ----------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["cpu", TRITON])
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
        assert_close("torch.func.grad", a, b, atol=1e-12)

    out, vjp_fn = torch.func.vjp(fast, p, g, lr)
    out_r, vjp_r = torch.func.vjp(ref.sgd_step, p, g, lr)
    cot = [torch.randn_like(o) for o in out]
    for a, b in zip(torch.utils._pytree.tree_leaves(vjp_fn(cot)), torch.utils._pytree.tree_leaves(vjp_r(cot))):
        assert_close("torch.func.vjp", a, b, atol=1e-12)

    # vmap over a batch of meta-batches: grads batched (folds into T), then also lr batched
    B = 2
    gb = [torch.randn(B, *x.shape, dtype=torch.float64) for x in g]
    lrb = torch.rand(B, 2, dtype=torch.float64)
    for in_dims, args in [((None, 0, None), (p, gb, lr)), ((None, 0, 0), (p, gb, lrb)), ((0, 0, None), ([torch.randn(B, *x.shape, dtype=torch.float64) for x in p], gb, lr))]:
        a = torch.func.vmap(fast, in_dims=in_dims)(*args)
        b = torch.func.vmap(ref.sgd_step, in_dims=in_dims)(*args)
        for x, y in zip(a, b):
            assert_close(f"vmap {in_dims}", x, y, atol=1e-12)
    # per-example gradients: vmap of grad
    per = torch.func.vmap(torch.func.grad(lambda g, lr: loss(fast, p, g, lr), argnums=(0, 1)), in_dims=(0, None))(gb, lr)
    per_r = torch.func.vmap(torch.func.grad(lambda g, lr: loss(ref.sgd_step, p, g, lr), argnums=(0, 1)), in_dims=(0, None))(gb, lr)
    for a, b in zip(torch.utils._pytree.tree_leaves(per), torch.utils._pytree.tree_leaves(per_r)):
        assert_close("vmap(grad)", a, b, atol=1e-12)


# ---- bad inputs ----------------------------------------------------------------------



# ---- CUDA (run by the device check) ----------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", TRITON])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("lr_kind", LR_KINDS)
@pytest.mark.parametrize("theta_mode", THETA_MODES)
@pytest.mark.parametrize("index64", [False, True])
def test_gpu_backend_matches(backend, dtype, lr_kind, theta_mode, index64, monkeypatch):
    if index64 and backend != "cuda":
        pytest.skip("the 64-bit switch is a CUDA launcher option (Triton offsets are always int64)")
    monkeypatch.setattr(launch, "FORCE_INDEX64", index64)
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
        assert_close("flush forward", o, e, atol=1e-6 * (1 + e.abs()))
    v = [torch.randn_like(o) for o in out]
    runs = [torch.autograd.grad(sgd_step(p, g, lr, backend="cuda"), [lr], v)[0] for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    ind = -sum((gi.double() * vi.double()).sum() for gi, vi in zip(g, v))
    mag = sum((gi.double() * vi.double()).abs().sum() for gi, vi in zip(g, v))
    assert_close("flush dlr", runs[0].cpu(), ind.cpu(), atol=float(8 * EPS[torch.float32] * mag))


@pytest.mark.cuda
def test_cuda_bad_device_mix():
    p = [torch.randn(3, device="cuda")]
    g = [torch.randn(2, 3)]
    with pytest.raises(ValueError, match="must be on"):
        sgd_step(p, g, 0.1)
