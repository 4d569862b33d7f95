"""Cases shared by the maml_mlp tests: problems, every lr granularity, and :func:`check`
(the op against :func:`fastmaml.reference.maml_mlp`: values and every gradient)."""

from __future__ import annotations

import torch

from fastmaml import reference as ref
from fastmaml.ops import maml_mlp, maml_mlp_fit

from tests.helpers import assert_close

TOL = {torch.float64: (1e-10, 1e-13), torch.float32: (2e-4, 1e-6)}
PATHS = ["fused", "layerwise_cpu", "layerwise_reference", "factored"]
LOW_RANK_LR = ("float", "scalar", "table")  # the rates the factored path takes (not per element)


def close(name, got, want, dtype):
    """:func:`helpers.assert_close` with this op's tolerance, relative to the largest magnitude."""
    rtol, atol = TOL[dtype]
    assert_close(name, got, want, rtol=rtol, atol=atol, scale="max")


def use_path(path, monkeypatch) -> str:
    """The backend that runs maml_mlp on ``path``: the fused cpu kernel, the layer-wise
    path (cpu ops, reference ops) with the fused limit patched to 0 (nothing fits), or the
    factored path taken for every size (its size rule patched; per-element rates still
    take the fused kernel)."""
    if path == "fused":
        return "cpu"
    if path == "factored":
        monkeypatch.setattr(maml_mlp_fit, "prefers_factored",
                            lambda dims, steps, ns, lr_kind, backend, device: (backend == "cpu" and lr_kind in
                                                                               LOW_RANK_LR, "forced by the test"))
        return "cpu"
    monkeypatch.setattr(maml_mlp_fit, "FUSED_CPU_MAX_WORKSPACE_BYTES", 0)
    return "cpu" if path == "layerwise_cpu" else "reference"


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
    if kind == "fixed_table":  # MAML++ rates not learned: a different rate per tensor and step, no dα
        return 0.05 + 0.1 * torch.rand(K, len(shapes), generator=g, dtype=dtype)
    if kind == "fixed_scalar":
        return torch.tensor(0.1, dtype=dtype)
    if kind == "elem":
        return [(0.05 + 0.1 * torch.rand(s, generator=g, dtype=dtype)).requires_grad_() for s in shapes]
    if kind == "step_elem":
        return [(0.05 + 0.1 * torch.rand(K, *s, generator=g, dtype=dtype)).requires_grad_() for s in shapes]
    if kind == "mixed_elem":  # some tensors per step, some shared across steps
        return [(0.05 + 0.1 * torch.rand(*((K,) if i % 2 else ()), *s, generator=g, dtype=dtype)).requires_grad_()
                for i, s in enumerate(shapes)]
    raise AssertionError(kind)


def lr_tensors(lr):
    """The rate tensors that require grad (the ones differentiated)."""
    if isinstance(lr, torch.Tensor):
        return [lr] if lr.requires_grad else []
    if isinstance(lr, list):
        return [t for t in lr if t.requires_grad]
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
    close("meta-loss", got.detach(), want.detach(), dtype)
    names = [f"W{l}" for l in range(len(ws))] + [f"b{l}" for l in range(len(bs))]
    names += [f"lr[{i}]" for i in range(len(inputs) - len(names))]
    for n, a, b in zip(names, g_got, g_want):
        close(f"d meta / d {n}", a, b, dtype)
    for a, b in zip(before, (*inputs, xs, ys, xq, yq)):
        assert torch.equal(a, b.detach()), "an input was modified in place"
    return got, g_got
