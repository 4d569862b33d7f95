"""fastmaml.batch_norm: batch-statistics BatchNorm with the closed-form double backward
(C++ kernels on CPU), against PyTorch's own autograd of F.batch_norm, and its routing
into the generic MAML path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tests.maml.cases import F64, conv_bn_net, module_fn, module_params

from fastmaml import _ext
from fastmaml import batch_norm as bn
from fastmaml.maml import functional as generic
from fastmaml.maml.batch_norm_mode import FusedBatchNorm

needs_ext = pytest.mark.skipif(_ext._C is None, reason=_ext.IMPORT_ERROR or "extension not built")

SHAPES = [(4, 3, 5, 5), (6, 2), (3, 4, 7), (2, 3, 2, 3, 2)]


def _native(x, w, b, eps=1e-5):
    return F.batch_norm(x, None, None, w, b, True, 0.1, eps)


def _inputs(shape, dtype=F64, seed=0, mean=0.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=F64) + mean).to(dtype).requires_grad_(True)
    w = torch.randn(shape[1], generator=g, dtype=F64).to(dtype).requires_grad_(True)
    b = torch.randn(shape[1], generator=g, dtype=F64).to(dtype).requires_grad_(True)
    return x, w, b


def _first_and_second(f, x, w, b):
    """Output, the gradient of a nonlinear loss with create_graph, and the gradient of a
    nonlinear function of that gradient: every level a MAML HVP uses."""
    y = f(x, w, b)
    c = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    g = torch.autograd.grad((y.sin() * c).sum(), (x, w, b), create_graph=True)
    s = sum((gi * torch.cos(torch.arange(gi.numel(), dtype=gi.dtype)).view_as(gi)).sum() for gi in g)
    return [y, *g, *torch.autograd.grad(s, (x, w, b))]


@needs_ext
@pytest.mark.parametrize("shape", SHAPES)
def test_gradcheck_and_gradgradcheck(shape):
    x, w, b = _inputs(shape)
    f = lambda x, w, b: bn.batch_norm(x, w, b, 1e-5)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


@pytest.mark.parametrize("kernels", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_pytorch_to_second_order_float64(shape, kernels, monkeypatch):
    if kernels and _ext._C is None:
        pytest.skip(_ext.IMPORT_ERROR)
    if not kernels:  # the PyTorch-ops twin of the kernels
        monkeypatch.setattr(bn, "_kernels", lambda x: False)
    x, w, b = _inputs(shape, mean=3.0)  # a mean far from 0: no cancellation in the statistics
    got = _first_and_second(lambda x, w, b: bn.batch_norm(x, w, b, 1e-5), x, w, b)
    want = _first_and_second(_native, x, w, b)
    for i, (a, e) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10, msg=f"level output {i}")


@needs_ext
def test_float32_close_to_pytorch_and_independent_of_threads():
    x, w, b = _inputs((8, 16, 12, 12), dtype=torch.float32)
    got = _first_and_second(lambda x, w, b: bn.batch_norm(x, w, b, 1e-5), x, w, b)
    want = _first_and_second(_native, x, w, b)
    for i, (a, e) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4, msg=f"level output {i}")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _first_and_second(lambda x, w, b: bn.batch_norm(x, w, b, 1e-5), x, w, b)
    finally:
        torch.set_num_threads(before)
    for a, e in zip(one, got):  # a channel's sums never depend on the thread count
        assert torch.equal(a, e)


@needs_ext
def test_missing_cotangents_and_noncontiguous_input():
    x, w, b = _inputs((5, 3, 4, 4))
    xcl = x.detach().to(memory_format=torch.channels_last).requires_grad_(True)
    y = bn.batch_norm(xcl, w, b)
    torch.testing.assert_close(y, _native(x, w, b), rtol=1e-12, atol=1e-12)
    # Second derivative through dw only (dx, db get no cotangent: the kernel's a = None path).
    def second(f):
        dw = torch.autograd.grad(f(x, w, b).pow(3).sum(), w, create_graph=True)[0]
        return torch.autograd.grad(dw.sum(), (x, w))

    for a, e in zip(second(bn.batch_norm), second(_native)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


@needs_ext
def test_inputs_unchanged_and_third_derivative_raises():
    x, w, b = _inputs((4, 3, 5))
    copies = [t.detach().clone() for t in (x, w, b)]
    y = bn.batch_norm(x, w, b)
    g = torch.autograd.grad(y.pow(2).sum(), (x, w, b), create_graph=True)
    h = torch.autograd.grad(sum((gi ** 2).sum() for gi in g), (x, w, b), create_graph=True)
    for t, c in zip((x, w, b), copies):
        assert torch.equal(t.detach(), c)
    with pytest.raises(RuntimeError, match="third derivatives"):
        torch.autograd.grad(sum(hi.sum() for hi in h), (x, w, b))


def test_mode_routes_only_what_it_covers(monkeypatch):
    calls = []
    real = bn._run  # what the mode calls
    monkeypatch.setattr(bn, "_run", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(4, 3, 5, 5, dtype=F64)
    with FusedBatchNorm():
        torch.nn.BatchNorm2d(3, track_running_stats=False).double()(x)  # covered
        assert len(calls) == 1
        torch.nn.BatchNorm2d(3).double()(x)  # updates running statistics: PyTorch's
        torch.nn.BatchNorm2d(3, affine=False, track_running_stats=False).double()(x)  # not affine
        torch.nn.BatchNorm2d(3).double().eval()(x)  # running statistics
        torch.nn.BatchNorm2d(3, track_running_stats=False).half()(x.half())  # float16
        m = torch.nn.BatchNorm2d(3, track_running_stats=False).double()
        torch.func.vmap(lambda z: torch.func.functional_call(m, dict(m.named_parameters()), (z,)))(x.unsqueeze(0))
        assert len(calls) == 1
    torch.nn.BatchNorm2d(3, track_running_stats=False).double()(x)  # outside the mode
    assert len(calls) == 1


# --- in the generic MAML path ------------------------------------------------------------
@needs_ext
@pytest.mark.parametrize("pool", [False, True])
def test_generic_path_fused_equals_native_and_is_used(pool, monkeypatch):
    torch.manual_seed(4)
    model = conv_bn_net(pool).double()
    params = module_params(model)
    g = torch.Generator().manual_seed(6)
    T = 3
    data = (torch.randn(T, 4, 1, 8, 8, generator=g, dtype=F64), torch.randint(0, 3, (T, 4), generator=g),
            torch.randn(T, 5, 1, 8, 8, generator=g, dtype=F64), torch.randint(0, 3, (T, 5), generator=g))
    calls = []
    real = bn._run  # what the mode calls
    monkeypatch.setattr(bn, "_run", lambda *a: calls.append(1) or real(*a))
    res = []
    for fused in (True, False):
        p = {n: v.clone().requires_grad_(True) for n, v in params.items()}
        L = generic.maml_loss(module_fn(model), p, 0.3, *data, steps=3, loss="cross_entropy", task_map="loop",
                              hvp_map="loop", graph_memory_mb=0, fused_batch_norm=fused)
        res.append([L.detach(), *torch.autograd.grad(L, list(p.values()))])
        if fused:
            assert calls, "the fused BatchNorm was not used"
            n_fused = len(calls)
    assert len(calls) == n_fused  # fused_batch_norm=False: never
    for a, e in zip(*res):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
    with pytest.raises(TypeError, match="fused_batch_norm must be a bool"):
        generic.maml_loss(module_fn(model), params, 0.3, *data, steps=1, loss="cross_entropy", fused_batch_norm="yes")


def test_bad_arguments_are_named():
    x, w, b = _inputs((4, 3, 5))
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
        bn.batch_norm(x, w[:2], b)
    with pytest.raises(TypeError, match="bias must be torch.float64"):
        bn.batch_norm(x, w, b.float())
    with pytest.raises(TypeError, match="x must be float32 or float64"):
        bn.batch_norm(x.half(), w, b)
    with pytest.raises(ValueError, match=r"x must be \[N, C, \*\]"):
        bn.batch_norm(x[0, 0], w, b)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn.batch_norm(x[:1, :, :1], w, b)
    with pytest.raises(ValueError, match="eps must be a number >= 0"):
        bn.batch_norm(x, w, b, eps=-1.0)
