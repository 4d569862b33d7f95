"""fastmaml.maml.mlp_replay: a MAML call on the fused MLP route replays the plan of the
previous call when nothing it depends on changed, and gives bitwise the numbers of a full
call; any change (values that fail a check, shapes, strides, dtypes, grad mode, rates,
the backend) takes the full path, which answers or raises as without a replay."""

from __future__ import annotations

import copy

import pytest
import torch

import fastmaml
from fastmaml.maml import mlp_path


def _net(d_in=1, hidden=40, d_out=1, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(d_in, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden),
                               torch.nn.ReLU(), torch.nn.Linear(hidden, d_out))


def _batch(T=5, Ns=10, Nq=7, d_in=1, d_out=1, ce=False, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(T, Ns, d_in, generator=g, dtype=dtype)
    xq = torch.randn(T, Nq, d_in, generator=g, dtype=dtype)
    if ce:
        ys = torch.randint(0, d_out, (T, Ns), generator=g)
        yq = torch.randint(0, d_out, (T, Nq), generator=g)
    else:
        ys = torch.randn(T, Ns, d_out, generator=g, dtype=dtype)
        yq = torch.randn(T, Nq, d_out, generator=g, dtype=dtype)
    return xs, ys, xq, yq


@pytest.fixture
def full_calls(monkeypatch):
    """How many calls took the full path (mlp_path.run_with_plan)."""
    n = [0]
    real = mlp_path.run_with_plan

    def counting(*a, **k):
        n[0] += 1
        return real(*a, **k)

    monkeypatch.setattr(mlp_path, "run_with_plan", counting)
    return n


def _step(m, batch):
    for p in m.parameters():
        p.grad = None
    loss = m(*batch)
    if loss.requires_grad:
        loss.backward()
    return loss.detach().clone(), [None if p.grad is None else p.grad.clone() for p in m.parameters()]


def _fresh(m):
    """The same MAML layer without any history (its first call takes the full path)."""
    f = copy.deepcopy(m)
    f._mlp_plan = None
    return f


def _same(a, b):
    (la, ga), (lb, gb) = a, b
    assert torch.equal(la, lb)
    assert len(ga) == len(gb)
    for x, y in zip(ga, gb):
        assert (x is None and y is None) or torch.equal(x, y)


@pytest.mark.parametrize("kind", ["mse", "ce", "learned_lr", "first_order", "msl"])
def test_replay_agrees_with_the_full_path(full_calls, kind):
    ce = kind == "ce"
    net = _net(d_in=3, hidden=16, d_out=4 if ce else 1)
    kw = dict(inner_lr=0.05, inner_steps=3, loss="cross_entropy" if ce else "mse",
              learn_lr=kind == "learned_lr", first_order=kind == "first_order",
              msl_weights=[0.2, 0.3, 0.5] if kind == "msl" else None)
    m = fastmaml.MAML(net, **kw)
    for i in range(4):
        batch = _batch(d_in=3, d_out=4 if ce else 1, ce=ce, seed=10 + i)
        want = _step(_fresh(m), batch)
        before = full_calls[0]
        got = _step(m, batch)
        assert full_calls[0] - before == (1 if i == 0 else 0)  # the full path on the first call only
        assert m.path == "fused_mlp"
        _same(got, want)
        ref = fastmaml.MAML(copy.deepcopy(net), backend="reference", **kw)
        lr_, gr_ = _step(ref, batch)
        torch.testing.assert_close(got[0], lr_, rtol=1e-5, atol=1e-6)
        for a, b in zip(got[1], gr_):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert m._mlp_plan is not None and m._mlp_plan[1].xs is None  # the plan holds no batch


def test_value_changes_are_checked(full_calls):
    m = fastmaml.MAML(_net(), inner_lr=0.01, inner_steps=2)
    batch = _batch()
    _step(m, batch)
    for i, name in ((0, "xs"), (1, "ys"), (2, "xq"), (3, "yq")):
        bad = list(batch)
        bad[i] = bad[i].clone()
        bad[i][1, 2, 0] = float("nan")
        with pytest.raises(ValueError, match=name):
            m(*bad)
    with torch.no_grad():
        w = m.model[2].weight
        keep = w[0, 0].item()
        w[0, 0] = float("inf")
    with pytest.raises(ValueError, match="inf|Inf|finite"):
        m(*batch)
    with torch.no_grad():
        w[0, 0] = keep
    m.inner_lr = -0.5
    with pytest.raises(ValueError, match="finite float > 0"):
        m(*batch)
    m.inner_lr = 0.03  # a new valid rate replays with it
    n = full_calls[0]
    want = _step(_fresh(m), batch)
    got = _step(m, batch)
    _same(got, want)
    m.first_order = True
    _same(_step(m, batch), _step(_fresh(m), batch))
    assert full_calls[0] >= n + 2


def test_labels_are_checked_on_replay():
    m = fastmaml.MAML(_net(d_in=2, hidden=8, d_out=3), inner_lr=0.1, inner_steps=2, loss="cross_entropy")
    batch = _batch(d_in=2, d_out=3, ce=True)
    _step(m, batch)
    for i, bad_label in ((1, 3), (3, -1)):
        bad = list(batch)
        bad[i] = bad[i].clone()
        bad[i][0, 0] = bad_label
        with pytest.raises(ValueError, match="labels outside"):
            m(*bad)
    _step(m, batch)


def test_signature_changes_take_the_full_path(full_calls, monkeypatch):
    m = fastmaml.MAML(_net(d_in=2, hidden=12), inner_lr=0.02, inner_steps=2)
    batch = _batch(d_in=2)
    _step(m, batch)
    # strided data: the same numbers as the contiguous copy
    wide = [torch.cat([t, t], dim=-1) if t.dim() == 3 else t for t in batch]
    strided = [w[..., : t.shape[-1]] for w, t in zip(wide, batch)]
    assert not strided[0].is_contiguous()
    n = full_calls[0]
    _same(_step(m, strided), _step(_fresh(m), batch))
    assert full_calls[0] == n + 2
    # another number of tasks, points
    other = _batch(T=3, Ns=4, Nq=9, d_in=2, seed=5)
    _same(_step(m, other), _step(_fresh(m), other))
    _same(_step(m, batch), _step(_fresh(m), batch))
    # grad mode off: the loss only
    with torch.no_grad():
        assert not m(*batch).requires_grad
    # each change below follows a call that replays (a live plan)
    def warm():
        k = full_calls[0]
        _step(m, batch)
        _step(m, batch)
        assert full_calls[0] <= k + 1
    # a parameter of another shape (the same object), or dtype: the full path refuses it
    lin = m.model[0]
    keep = lin.weight.data
    warm()
    lin.weight.data = torch.randn(12, 3)
    with pytest.raises(ValueError, match=r"weights\[1\] takes 12 inputs|shape"):
        m(*batch)
    lin.weight.data = keep
    warm()
    m.model[2].double()
    with pytest.raises(TypeError, match="dtype"):
        m(*batch)
    m.model[2].float()
    _same(_step(m, batch), _step(_fresh(m), batch))
    # a query label set of another size, or targets of another dtype: refused
    for bad in ((*batch[:3], batch[3][:, :-1]), (*batch[:3], batch[3][:, :-1].contiguous()),
                (batch[0], batch[1].double(), *batch[2:]),
                (*batch[:3], batch[3].double())):
        warm()
        with pytest.raises((ValueError, TypeError), match="yq|ys"):
            m(*bad)
    # float64 model and data
    m.double()
    b64 = [t.double() if t.is_floating_point() else t for t in batch]
    _same(_step(m, b64), _step(_fresh(m), b64))
    m.float()
    # a parameter frozen after the first call
    m.model[4].bias.requires_grad_(False)
    got = _step(m, batch)
    assert got[1][-1] is None and m.path != "fused_mlp"
    m.model[4].bias.requires_grad_(True)
    _same(_step(m, batch), _step(_fresh(m), batch))
    # data that require grad: the reference path
    xs = batch[0].clone().requires_grad_(True)
    m(xs, *batch[1:]).backward()
    assert m.path == "reference" and xs.grad is not None
    # the backend chosen by the environment
    _step(m, batch)
    n = full_calls[0]
    monkeypatch.setenv("FASTMAML_BACKEND", "reference")
    got = _step(m, batch)
    assert full_calls[0] == n + 1
    monkeypatch.delenv("FASTMAML_BACKEND")
    want = _step(_fresh(m), batch)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)


def test_rate_kind_change_takes_the_full_path(full_calls):
    """A learned 0-d rate, then the fixed float (learn_lr switched off on the same layer),
    then back: each form's numbers, not the other form's plan."""
    m = fastmaml.MAML(_net(d_in=2, hidden=8), inner_lr=0.05, inner_steps=2, learn_lr=True)
    batch = _batch(d_in=2)
    _step(m, batch)
    _step(m, batch)
    for learn in (False, True, False):
        m.learn_lr = learn
        n = full_calls[0]
        got = _step(m, batch)
        assert full_calls[0] == n + 1
        want = _step(_fresh(m), batch)
        _same(got, want)
