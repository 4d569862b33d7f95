"""Emulated twins of the GPU tests of ``sgd_step``: the CUDA backend's kernels
(multi_tensor_kernel with the forward and backward functors, sum_segments_kernel) run
through the emulated build on CPU tensors, for every lr granularity, shared, per-task and
mixed θ, both index widths, float32 and float64, the out= form, the multi-launch flush
and bitwise determinism; each against the reference and a float64 per-task loop."""

from __future__ import annotations

import importlib
import random
import sys

import pytest
import torch

from fastmaml import ops
from fastmaml import reference as ref

OP = importlib.import_module("fastmaml.ops._sgd_step.launch")  # holds FORCE_INDEX64
BACKEND = "cuda"
LR_KINDS = ("float", "scalar", "per_tensor", "per_element")
THETA_MODES = ("shared", "per_task", "mixed")
EPS = {torch.float32: torch.finfo(torch.float32).eps, torch.float64: torch.finfo(torch.float64).eps}


def tol(dtype, magnitude):
    """float64: 1e-12 absolute on these sizes; float32: a few roundings of the terms."""
    if dtype == torch.float64:
        return torch.full_like(magnitude.double(), 1e-12)
    return 8 * EPS[dtype] * magnitude.double() + 1e-30


def close(got, want, bound, what):
    err = (got.double() - want.double()).abs()
    assert got.shape == want.shape, what
    assert bool((err <= bound).all()), f"{what}: worst error {err.max().item():.3e}"


def case(seed, dtype, T, lr_kind, theta_mode, n=None):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    n = n or rng.randint(1, 5)
    pool = [(1,), (7,), (5, 3), (2, 3, 3), (300,), (17, 19), (257,)]
    shapes = [rng.choice(pool) for _ in range(n)]
    shared = [theta_mode == "shared" or (theta_mode == "mixed" and i % 2 == 0) for i in range(n)]
    params = [torch.randn(s if sh else (T, *s), generator=gen, dtype=dtype) for s, sh in zip(shapes, shared)]
    grads = [torch.randn((T, *s), generator=gen, dtype=dtype) for s in shapes]
    if lr_kind == "float":
        lr = 0.37
    elif lr_kind == "scalar":
        lr = torch.tensor(0.37, dtype=dtype)
    elif lr_kind == "per_tensor":
        lr = torch.rand(n, generator=gen, dtype=dtype)
    else:
        lr = [torch.rand(s, generator=gen, dtype=dtype) for s in shapes]
    return params, grads, lr, shared


def lr_list(lr):
    return [] if isinstance(lr, float) else ([lr] if isinstance(lr, torch.Tensor) else list(lr))


def alpha(lr, i):
    if isinstance(lr, float):
        return lr
    if isinstance(lr, torch.Tensor):
        return lr.double() if lr.dim() == 0 else lr[i].double()
    return lr[i].double()


def check(dtype, T, lr_kind, theta_mode, seed):
    params, grads, lr, shared = case(seed, dtype, T, lr_kind, theta_mode)
    before = [t.clone() for t in params + grads + lr_list(lr)]
    out = ops.sgd_step(params, grads, lr, backend=BACKEND)
    want = ref.sgd_step(params, grads, lr)
    for i, (o, w) in enumerate(zip(out, want)):
        assert o.dtype == dtype
        mag = params[i].double().abs() + (alpha(lr, i) * grads[i].double()).abs()
        close(o, w, tol(dtype, mag.expand_as(w)), f"out[{i}]")
    P = [p.clone().requires_grad_() for p in params]
    G = [g.clone().requires_grad_() for g in grads]
    L = lr if isinstance(lr, float) else ([a.clone().requires_grad_() for a in lr] if isinstance(lr, list)
                                          else lr.clone().requires_grad_())
    v = [torch.randn_like(o) for o in out]
    inputs = P + G + lr_list(L)
    d = torch.autograd.grad(ops.sgd_step(P, G, L, backend=BACKEND), inputs, v)
    P64 = [p.detach().double().requires_grad_() for p in P]
    G64 = [g.detach().double().requires_grad_() for g in G]
    L64 = L if isinstance(L, float) else ([a.detach().double().requires_grad_() for a in L] if isinstance(L, list)
                                          else L.detach().double().requires_grad_())
    inputs64 = P64 + G64 + lr_list(L64)
    d_ref = torch.autograd.grad(ref.sgd_step(P64, G64, L64), inputs64, [x.double() for x in v])
    # magnitudes of the sums behind each gradient (Σ_t |v|, |α v|, Σ |g v|)
    d_mag = torch.autograd.grad(ref.sgd_step(P64, G64, L64), inputs64, [x.double().abs() for x in v])
    gv_mag = [(g.double() * x.double()).abs() for g, x in zip(grads, v)]
    n = len(params)
    for i in range(n):
        close(d[i], d_ref[i], tol(dtype, d_mag[i].abs()), f"dparams[{i}]")
        close(d[n + i], d_ref[n + i], tol(dtype, d_mag[n + i].abs()), f"dgrads[{i}]")
    if not isinstance(lr, float):
        if isinstance(lr, list):
            for i in range(n):
                close(d[2 * n + i], d_ref[2 * n + i], tol(dtype, gv_mag[i].sum(0)), f"dlr[{i}]")
        elif lr.dim() == 0:
            close(d[2 * n], d_ref[2 * n], tol(dtype, sum(m.sum() for m in gv_mag)), "dlr")
        else:
            close(d[2 * n], d_ref[2 * n], tol(dtype, torch.stack([m.sum() for m in gv_mag])), "dlr")
    for a, b in zip(before, params + grads + lr_list(lr)):
        assert torch.equal(a, b), "an input was modified"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("lr_kind", LR_KINDS)
@pytest.mark.parametrize("theta_mode", THETA_MODES)
@pytest.mark.parametrize("index64", [False, True], ids=["i32", "i64"])
def test_emulated_kernels_match_reference(dtype, lr_kind, theta_mode, index64, monkeypatch):
    monkeypatch.setattr(OP, "FORCE_INDEX64", index64)
    for T in (1, 3):
        check(dtype, T, lr_kind, theta_mode, seed=T + 10 * LR_KINDS.index(lr_kind))


def test_emulated_out_form():
    params, grads, lr, _ = case(5, torch.float32, 3, "per_element", "mixed", n=3)
    outs = [torch.empty_like(g) for g in grads]
    got = ops.sgd_step(params, grads, lr, out=outs, backend=BACKEND)
    assert all(a is b for a, b in zip(got, outs))
    for o, w in zip(outs, ref.sgd_step(params, grads, lr)):
        close(o, w, tol(torch.float32, w.abs() + 1), "out=")


def test_emulated_many_tensors_flush_and_bitwise_determinism():
    """More tensors than table slots (24) and more blocks than block slots (256): several launches."""
    gen = torch.Generator().manual_seed(1)
    shapes = [(i % 3 + 1, 30 + i) for i in range(30)] + [(70_000,)]
    p = [torch.randn(s, generator=gen) for s in shapes]
    g = [torch.randn((2, *s), generator=gen) for s in shapes]
    lr = torch.tensor(0.2, requires_grad=True)
    C = sys.modules["fastmaml._C"]
    before = C.cuda_emulation_stats().get("multi_tensor_kernel", {}).get("launches", 0)
    out = ops.sgd_step(p, g, lr, backend=BACKEND)
    assert C.cuda_emulation_stats()["multi_tensor_kernel"]["launches"] >= before + 2  # the table was flushed
    for o, e in zip(out, ref.sgd_step(p, g, lr)):
        close(o, e, 1e-6 * (1 + e.abs()), "flush forward")
    v = [torch.randn_like(o) for o in out]
    runs = [torch.autograd.grad(ops.sgd_step(p, g, lr, backend=BACKEND), [lr], v)[0] for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    ind = -sum((gi.double() * vi.double()).sum() for gi, vi in zip(g, v))
    mag = sum((gi.double() * vi.double()).abs().sum() for gi, vi in zip(g, v))
    close(runs[0], ind, float(8 * EPS[torch.float32] * mag), "flush dlr")


def test_emulated_bad_device_mix():
    p = [torch.randn(3, device="meta")]
    g = [torch.randn(2, 3)]
    with pytest.raises(ValueError, match="must be on"):
        ops.sgd_step(p, g, 0.1, backend=BACKEND)
