"""``fastmaml.ops.sgd_step(..., out=)`` and the lean CPU entry: caller-provided outputs
on every backend, the lean path's decisions, and the backend resolution fast path."""

from __future__ import annotations

import zlib

import pytest
import torch
from helpers import assert_close
from sgd_step_cases import CPU_BACKENDS, LR_KINDS, THETA_MODES, alpha_of, elem_tol, lr_tensors, make_case

from fastmaml import _ext, backends
from fastmaml import reference as ref
from fastmaml.ops import sgd_step
from fastmaml.ops._sgd_step import launch

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
        assert_close(f"{backend} out[{i}] vs reference", out[i], expect[i], atol=tol)
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
    real = launch.lean_cpu_forward

    def spy(*args):
        res = real(*args)
        calls.append(res is not None)
        return res

    monkeypatch.setattr(launch, "lean_cpu_forward", spy)
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
        assert_close("lean out", o, w, atol=elem_tol(dtype, w.abs() + 1))
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
    assert_close("requires_grad input, no grad mode", out[1], (p[1] - 0.5 * rg).detach(), atol=1e-6)
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
        assert_close("lean out=", o, w, atol=1e-6)
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
    assert_close("lean via sgd_step", out[1], p[1] - 0.1 * g[1], atol=1e-6)
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
    assert_close("one-buffer output", out[1], pb[1] - 0.1 * gb[1], atol=1e-6)
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
    assert_close("auto without the extension", sgd_step(p, g, 0.25)[0], p[0] - 0.25 * g[0], atol=1e-6)


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
