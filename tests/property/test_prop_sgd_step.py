"""Property: ``ops.sgd_step`` on the cpu backend equals the reference twin, forward and
backward, for random task counts, shapes, lr granularities, dtypes, shared or per-task
θ; strided inputs are either taken (same result) or refused with the documented
"must be contiguous" error."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fastmaml import ops
from prop_util import DTYPES, assert_all_close, randn, seeds, strided_copy, tol

SHAPES = st.lists(st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple), min_size=1, max_size=4)
LR_KINDS = st.sampled_from(["float", "scalar", "per_tensor", "per_element"])


def _case(seed, T, shapes, dtype, lr_kind, shared):
    g = torch.Generator().manual_seed(seed)
    params = [randn(g, *(() if shared else (T,)), *s, dtype=dtype) for s in shapes]
    grads = [randn(g, T, *s, dtype=dtype) for s in shapes]
    if lr_kind == "float":
        lr = 0.05
    elif lr_kind == "scalar":
        lr = randn(g, dtype=dtype).abs() * 0.1
    elif lr_kind == "per_tensor":
        lr = randn(g, len(shapes), dtype=dtype).abs() * 0.1
    else:
        lr = [randn(g, *s, dtype=dtype).abs() * 0.1 for s in shapes]
    return params, grads, lr


def _leaves(params, grads, lr):
    ps = [p.clone().requires_grad_(True) for p in params]
    gs = [x.clone().requires_grad_(True) for x in grads]
    if isinstance(lr, torch.Tensor):
        lr = lr.clone().requires_grad_(True)
    elif isinstance(lr, list):
        lr = [x.clone().requires_grad_(True) for x in lr]
    return ps, gs, lr


def _lr_list(lr):
    return [lr] if isinstance(lr, torch.Tensor) else (list(lr) if isinstance(lr, list) else [])


@given(seed=seeds(), T=st.integers(1, 4), shapes=SHAPES, dtype=DTYPES, lr_kind=LR_KINDS, shared=st.booleans())
def test_sgd_step_cpu_equals_reference_forward_and_backward(seed, T, shapes, dtype, lr_kind, shared):
    params, grads, lr = _case(seed, T, shapes, dtype, lr_kind, shared)
    out = {}
    for backend in ("reference", "cpu"):
        ps, gs, lrs = _leaves(params, grads, lr)
        new = ops.sgd_step(ps, gs, lrs, backend=backend)
        g = torch.Generator().manual_seed(seed + 1)
        cot = [randn(g, *n.shape, dtype=dtype) for n in new]
        sum((n * c).sum() for n, c in zip(new, cot)).backward()
        out[backend] = (new, [p.grad for p in ps], [x.grad for x in gs], [x.grad for x in _lr_list(lrs)])
    for i, name in enumerate(("out", "d params", "d grads", "d lr")):
        assert_all_close(name, [t.detach() for t in out["cpu"][i]], [t.detach() for t in out["reference"][i]],
                         tol(dtype))


@given(seed=seeds(), T=st.integers(1, 3), shapes=SHAPES, dtype=DTYPES, lr_kind=LR_KINDS, how=st.integers(0, 1),
       which=st.integers(0, 1))
def test_sgd_step_strided_inputs_equal_or_refused(seed, T, shapes, dtype, lr_kind, how, which):
    params, grads, lr = _case(seed, T, shapes, dtype, lr_kind, False)
    want = ops.sgd_step(params, grads, lr, backend="cpu")
    args = [list(params), list(grads)]
    args[which][0] = strided_copy(args[which][0], how)
    if args[which][0].is_contiguous():
        return  # this shape has no non-contiguous layout of that kind
    try:
        got = ops.sgd_step(*args, lr, backend="cpu")
    except ValueError as e:
        assert "must be contiguous" in str(e)
        return
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_sgd_step_propagates_nonfinite_values(bad):
    p = [torch.zeros(2, 3)]
    g = [torch.ones(2, 3)]
    g[0][1, 2] = bad
    for backend in ("cpu", "reference"):
        out = ops.sgd_step(p, g, 0.1, backend=backend)[0]
        assert not torch.isfinite(out[1, 2]) and torch.isfinite(out[0]).all()
