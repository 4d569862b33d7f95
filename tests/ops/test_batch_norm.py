"""fastmaml.ops.batch_norm: batch-statistics BatchNorm with the closed-form double backward
(C++ kernels on CPU) against PyTorch's own autograd of F.batch_norm: beyond the op-vs-twin
agreement (the registry, tests/ops/test_registry.py), gradcheck, float32 and threads,
missing cotangents, the third derivative, the backend argument and bad arguments."""

from __future__ import annotations

import pytest
import torch

from fastmaml import _ext
from fastmaml import reference as ref
from fastmaml.ops import batch_norm

from tests.ops.batch_norm_cases import SHAPES, _first_and_second, _inputs, _native

needs_ext = pytest.mark.skipif(_ext._C is None, reason=_ext.IMPORT_ERROR or "extension not built")


@needs_ext
@pytest.mark.parametrize("shape", SHAPES)
def test_gradcheck_and_gradgradcheck(shape):
    x, w, b = _inputs(shape)
    f = lambda x, w, b: batch_norm(x, w, b, 1e-5)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


@needs_ext
def test_float32_close_to_pytorch_and_independent_of_threads():
    x, w, b = _inputs((8, 16, 12, 12), dtype=torch.float32)
    got = _first_and_second(lambda x, w, b: batch_norm(x, w, b, 1e-5), x, w, b)
    want = _first_and_second(_native, x, w, b)
    for i, (a, e) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4, msg=f"level output {i}")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _first_and_second(lambda x, w, b: batch_norm(x, w, b, 1e-5), x, w, b)
    finally:
        torch.set_num_threads(before)
    for a, e in zip(one, got):  # a channel's sums never depend on the thread count
        assert torch.equal(a, e)


CL_SHAPES = [(4, 3, 5, 5), (75, 8, 9, 11), (3, 5, 2, 1), (2, 6, 130, 3)]  # 130 x 3 x 2 rows: several row blocks


@needs_ext
@pytest.mark.parametrize("shape", CL_SHAPES)
def test_channels_last_kernels_every_level(shape):
    """A channels_last x runs the row-block kernels (layout 1) in place, not a copy: every
    level agrees with F.batch_norm in float64, gradcheck and gradgradcheck hold, y and dx
    stay channels_last, and the results do not depend on the thread count."""
    x, w, b = _inputs(shape, mean=3.0)
    xcl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    assert xcl.is_contiguous(memory_format=torch.channels_last) and not xcl.is_contiguous()
    f = lambda x, w, b: batch_norm(x, w, b, 1e-5)  # noqa: E731
    got = _first_and_second(f, xcl, w, b)
    want = _first_and_second(_native, x, w, b)
    for i, (a, e) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9, msg=f"level output {i}")
    y = f(xcl, w, b)
    dx = torch.autograd.grad(y.sin().sum(), xcl)[0]
    assert y.is_contiguous(memory_format=torch.channels_last) and dx.is_contiguous(memory_format=torch.channels_last)
    if shape[0] * shape[2] * shape[3] <= 100:
        assert torch.autograd.gradcheck(f, (xcl, w, b))
        assert torch.autograd.gradgradcheck(f, (xcl, w, b))
    x32, w32, b32 = (t.detach().float().requires_grad_(True) for t in (xcl, w, b))
    x32 = x32.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    many = _first_and_second(f, x32, w32, b32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _first_and_second(f, x32, w32, b32)
    finally:
        torch.set_num_threads(before)
    for a, e in zip(one, many):  # the row blocks' sums are added in block order
        assert torch.equal(a, e)


@needs_ext
def test_missing_cotangents_and_noncontiguous_input():
    x, w, b = _inputs((5, 3, 4, 4))
    xcl = x.detach().to(memory_format=torch.channels_last).requires_grad_(True)
    y = batch_norm(xcl, w, b)
    torch.testing.assert_close(y, _native(x, w, b), rtol=1e-12, atol=1e-12)
    # Second derivative through dw only (dx, db get no cotangent: the kernel's a = None path).
    def second(f):
        dw = torch.autograd.grad(f(x, w, b).pow(3).sum(), w, create_graph=True)[0]
        return torch.autograd.grad(dw.sum(), (x, w))

    for a, e in zip(second(batch_norm), second(_native)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


@needs_ext
def test_inputs_unchanged_and_third_derivative_raises():
    x, w, b = _inputs((4, 3, 5))
    copies = [t.detach().clone() for t in (x, w, b)]
    y = batch_norm(x, w, b)
    g = torch.autograd.grad(y.pow(2).sum(), (x, w, b), create_graph=True)
    h = torch.autograd.grad(sum((gi ** 2).sum() for gi in g), (x, w, b), create_graph=True)
    for t, c in zip((x, w, b), copies):
        assert torch.equal(t.detach(), c)
    with pytest.raises(RuntimeError, match="third derivatives"):
        torch.autograd.grad(sum(hi.sum() for hi in h), (x, w, b))


def test_bad_arguments_are_named():
    x, w, b = _inputs((4, 3, 5))
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
        batch_norm(x, w[:2], b)
    with pytest.raises(TypeError, match="bias must be torch.float64"):
        batch_norm(x, w, b.float())
    with pytest.raises(TypeError, match="x must be float32 or float64"):
        batch_norm(x.half(), w, b)
    with pytest.raises(ValueError, match=r"x must be \[N, C, \*\]"):
        batch_norm(x[0, 0], w, b)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        batch_norm(x[:1, :, :1], w, b)
    with pytest.raises(ValueError, match="eps must be a number >= 0"):
        batch_norm(x, w, b, eps=-1.0)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_backend_argument_selects_the_levels(backend):
    """backend="cpu" runs the C++ kernels, backend="reference" the formulas of
    fastmaml.reference.batch_norm; both give F.batch_norm's numbers to second order."""
    if backend == "cpu" and _ext._C is None:
        pytest.skip(_ext.IMPORT_ERROR)
    x, w, b = _inputs((4, 3, 5))
    got = _first_and_second(lambda x, w, b: batch_norm(x, w, b, 1e-5, backend=backend), x, w, b)
    want = _first_and_second(_native, x, w, b)
    for i, (a, e) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10, msg=f"level output {i}")
    with pytest.raises(RuntimeError, match="third derivatives"):
        y = batch_norm(x, w, b, backend=backend)
        g = torch.autograd.grad(y.pow(2).sum(), (x, w, b), create_graph=True)
        h = torch.autograd.grad(sum((gi ** 2).sum() for gi in g), (x, w, b), create_graph=True)
        torch.autograd.grad(sum(hi.sum() for hi in h), (x, w, b))


def test_bad_backend_is_named():
    x, w, b = _inputs((4, 3, 5))
    with pytest.raises(ValueError, match="backend must be one of"):
        batch_norm(x, w, b, backend="cuda")
    with pytest.raises(ValueError, match="cannot run on meta tensors"):
        batch_norm(x.detach().to("meta"), w.detach().to("meta"), b.detach().to("meta"), backend="cpu")
    assert ref.batch_norm is not batch_norm


def test_ops_exported():
    import fastmaml.ops

    assert fastmaml.ops.batch_norm is batch_norm
