"""Cases and checks shared by the sgd_step tests: random parameter sets of every lr
granularity and θ layout, an independent per-task float64 computation of the forward
and backward, and :func:`check_backend` (a backend against both, and the reference's
autograd against the same bounds)."""

from __future__ import annotations

import random

import torch
from helpers import TRITON, assert_close

from fastmaml import reference as ref
from fastmaml.ops import sgd_step

LR_KINDS = ("float", "scalar", "per_tensor", "per_element")
THETA_MODES = ("shared", "per_task", "mixed")
EPS = {torch.float32: torch.finfo(torch.float32).eps, torch.float64: torch.finfo(torch.float64).eps}


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
        assert_close(f"{backend} out[{i}] vs independent", out[i], ind_out[i], atol=tol)
        assert_close(f"{backend} out[{i}] vs reference", out[i], expect[i], atol=tol)
    # backward through autograd
    P = [p.clone().requires_grad_() for p in params]
    G = [g.clone().requires_grad_() for g in grads]
    L = lr if isinstance(lr, float) else (lr.clone().requires_grad_() if isinstance(lr, torch.Tensor) else [a.clone().requires_grad_() for a in lr])
    o = sgd_step(P, G, L, backend=backend)
    for i in range(len(o)):
        assert_close(f"{backend} out[{i}] (autograd)", o[i].detach(), ind_out[i], atol=elem_tol(dtype, ind_out[i].abs() + 1))
    d = torch.autograd.grad(o, P + G + lr_tensors(L), v)
    # the reference's autograd must meet the same bounds (so backend ≈ reference too)
    d_ref = torch.autograd.grad(ref.sgd_step(P, G, L), P + G + lr_tensors(L), v)
    n = len(params)
    for who, dd in ((backend, d), ("reference autograd", d_ref)):
        for i in range(n):
            acc, mag = ind_dth[i]
            assert_close(f"{who} dparams[{i}]", dd[i], acc, atol=elem_tol(dtype, mag))
            assert_close(f"{who} dgrads[{i}]", dd[n + i], ind_dg[i], atol=elem_tol(dtype, ind_dg[i].abs()))
        if ind_dlr is not None:
            got = dd[2 * n :]
            if isinstance(ind_dlr, list):
                for i, (x, mag) in enumerate(ind_dlr):
                    assert_close(f"{who} dlr[{i}]", got[i], x, atol=elem_tol(dtype, mag))
            else:
                x, mag = ind_dlr
                assert_close(f"{who} dlr", got[0], x, atol=elem_tol(dtype, mag))
    for a, b in zip(before, params + grads + lr_tensors(lr)):
        assert torch.equal(a, b), "inputs were modified"




# every backend that takes CPU tensors (triton through its interpreter without a GPU)
CPU_BACKENDS = ["reference", "cpu", TRITON]
CPU_BACKEND_NAMES = ["reference", "cpu", "triton"]  # the same, for loops inside a test


def _good(dtype=torch.float32):
    return [torch.randn(3, dtype=dtype), torch.randn(2, 2, dtype=dtype)], [torch.randn(4, 3, dtype=dtype), torch.randn(4, 2, 2, dtype=dtype)]
