"""``fastmaml.ops.sgd_step``'s argument checks: bad inputs and bad ``out=`` raise
``TypeError``/``ValueError`` naming the argument on every backend, and the C++ boundary
re-checks what its kernels rely on."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close
from sgd_step_cases import CPU_BACKENDS, _good, lr_tensors

from fastmaml import _ext
from fastmaml.ops import sgd_step


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
    assert_close("out under no_grad", out[1].detach(), (p[1] - lr * g[1]).detach(), atol=1e-6)


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
    assert_close("fwd", o, p - 0.1 * g, atol=1e-6)
    for k, bad, exc in [(0, [float(p.data_ptr())], TypeError), (3, [True], TypeError), (2, o.data_ptr(), TypeError),
                        (4, [2**40], ValueError), (1, [-1], OverflowError)]:
        args = list(good)
        args[k] = bad
        with pytest.raises(exc):
            C.sgd_step_fwd_cpu(*args)


# ---- the lean forward (CPU, Python-float lr, nothing to differentiate) -----------------
