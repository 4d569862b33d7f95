"""maml_mlp's factored path (fastmaml.ops._maml_mlp.factored): when the op takes it by itself
(the size and rank rule, the rate kinds), its numbers against the reference at sizes that
take it without patching, and the MAML layer on the benchmark's wide MLP. The small shape
cases run it too, with the rule patched (the ``factored`` path of tests/ops/maml_mlp_cases.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastmaml
from fastmaml import reference as ref
from fastmaml.ops import maml_mlp
from fastmaml.ops import maml_mlp_fit as FIT
from fastmaml.ops._maml_mlp import function as FN

from tests.ops.maml_mlp_cases import check, close, make_lr, problem

WIDE = [784, 256, 128, 64, 64, 5]  # the benchmark's wide MLP (docs/DESIGN.md §5)
BIG = [512, 256, 5]  # 132,613 parameters: just past FACTORED_MIN_PARAMS


@pytest.fixture
def calls(monkeypatch):
    """Counts the factored and fused runs of maml_mlp."""
    n = {"factored": 0, "fused": 0}
    for name in n:
        real = getattr(FN, f"run_{name}")

        def counted(*a, _real=real, _name=name, **k):
            n[_name] += 1
            return _real(*a, **k)

        monkeypatch.setattr(FN, f"run_{name}", counted)
    return n


def test_rule():
    assert FIT.prefers_factored(WIDE, 5, 5, "scalar", "cpu")[0]  # rank 25
    assert FIT.prefers_factored(WIDE, 1, 5, "float", "cpu")[0]
    assert FIT.prefers_factored(WIDE, 5, 5, "table", "cpu")[0]
    ok, why = FIT.prefers_factored(WIDE, 5, 25, "scalar", "cpu")  # rank 125: past the bound
    assert not ok and "rank" in why
    ok, why = FIT.prefers_factored(WIDE, 5, 5, "elem", "cpu")
    assert not ok and "per-element" in why
    for backend in ("cuda", "reference", "triton"):
        assert not FIT.prefers_factored(WIDE, 5, 5, "scalar", backend)[0]
    ok, why = FIT.prefers_factored([1, 40, 40, 1], 5, 10, "scalar", "cpu")  # the sinusoid MLP: fused
    assert not ok and "parameters" in why
    # the size boundary: 512-256-5 has 132,613 parameters, 505-256-5 130,821 (rank rule met by both)
    assert sum(a * b + b for a, b in zip(BIG, BIG[1:])) >= FIT.FACTORED_MIN_PARAMS
    small = [505, 256, 5]
    assert sum(a * b + b for a, b in zip(small, small[1:])) < FIT.FACTORED_MIN_PARAMS
    assert FIT.prefers_factored(BIG, 2, 3, "scalar", "cpu")[0]
    assert not FIT.prefers_factored(small, 2, 3, "scalar", "cpu")[0]


@pytest.mark.parametrize("lr_kind", ["float", "scalar", "table", "fixed_table"])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("act_loss", [("relu", "cross_entropy"), ("tanh", "mse")])
def test_big_mlp_takes_it_and_matches_reference(calls, lr_kind, first_order, act_loss):
    activation, loss = act_loss
    check(BIG, 2, 3, 4, 2, lr_kind=lr_kind, first_order=first_order, activation=activation, loss=loss,
          msl=lr_kind == "table")
    assert calls == {"factored": 1, "fused": 0}


def test_float32_and_one_step(calls):
    check(BIG, 3, 5, 7, 1, lr_kind="scalar", loss="cross_entropy", dtype=torch.float32)
    check(BIG, 1, 1, 2, 3, lr_kind="float", dtype=torch.float32)
    assert calls == {"factored": 2, "fused": 0}


def test_per_element_rates_take_the_fused_kernel(calls):
    check(BIG, 2, 3, 4, 2, lr_kind="elem")
    assert calls == {"factored": 0, "fused": 1}


def test_no_grad_and_reproducible(calls):
    ws, bs, xs, ys, xq, yq = problem(BIG, 2, 3, 4, "mse", torch.float32)
    with torch.no_grad():
        m = maml_mlp(ws, bs, xs, ys, xq, yq, 0.1, steps=2)
        r = ref.maml_mlp(ws, bs, xs, ys, xq, yq, 0.1, steps=2)
    close("no-grad meta-loss", m, r, torch.float32)
    runs = []
    for _ in range(2):
        out = maml_mlp(ws, bs, xs, ys, xq, yq, 0.1, steps=2)
        runs.append([out.detach(), *torch.autograd.grad(out, ws + bs)])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    assert calls["factored"] == 3


def _wide(dtype):
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(WIDE, WIDE[1:])):
        layers += [nn.Linear(a, b, dtype=dtype)] + ([nn.ReLU()] if i < len(WIDE) - 2 else [])
    return nn.Sequential(*layers)


@pytest.mark.parametrize("first_order", [False, True])
def test_maml_on_the_wide_mlp_matches_the_reference_backend(calls, first_order):
    """The MAML layer on the benchmark's network, float64, against backend='reference',
    over two batches (MAML replays only fused-kernel plans: each call here is a full one)."""
    net = _wide(torch.float64)
    fast = fastmaml.MAML(net, inner_lr=0.4, inner_steps=2, loss="cross_entropy", first_order=first_order)
    slow = fastmaml.MAML(net, inner_lr=0.4, inner_steps=2, loss="cross_entropy", first_order=first_order,
                         backend="reference")
    g = torch.Generator().manual_seed(3)
    for _ in range(2):
        xs = torch.randn(3, 5, 784, generator=g, dtype=torch.float64)
        xq = torch.randn(3, 10, 784, generator=g, dtype=torch.float64)
        ys, yq = torch.randint(0, 5, (3, 5), generator=g), torch.randint(0, 5, (3, 10), generator=g)
        a = fast(xs, ys, xq, yq)
        ga = torch.autograd.grad(a, list(net.parameters()))
        b = slow(xs, ys, xq, yq)
        gb = torch.autograd.grad(b, list(net.parameters()))
        close("meta-loss", a.detach(), b.detach(), torch.float64)
        for x, y in zip(ga, gb):
            close("meta-gradient", x, y, torch.float64)
    assert fast.path == "fused_mlp" and "factored" in fast.path_reason, fast.path_reason
    assert calls == {"factored": 2, "fused": 0}


def test_learned_rates_on_the_wide_mlp(calls):
    """MAML++ rates (per step and layer, learned) get their gradient through the factored path."""
    net = _wide(torch.float64)
    kw = dict(inner_lr=0.1, inner_steps=2, loss="cross_entropy", lr_mode="per_step_layer", learn_lr=True)
    fast = fastmaml.MAML(net, **kw)
    slow = fastmaml.MAML(net, backend="reference", **kw)
    slow.load_state_dict(fast.state_dict())
    g = torch.Generator().manual_seed(4)
    xs, xq = (torch.randn(2, n, 784, generator=g, dtype=torch.float64) for n in (5, 6))
    ys, yq = torch.randint(0, 5, (2, 5), generator=g), torch.randint(0, 5, (2, 6), generator=g)
    ga = torch.autograd.grad(fast(xs, ys, xq, yq), list(fast.parameters()))
    gb = torch.autograd.grad(slow(xs, ys, xq, yq), list(slow.parameters()))
    assert len(ga) == len(gb) > len(list(net.parameters()))
    for x, y in zip(ga, gb):
        close("meta-gradient", x, y, torch.float64)
    assert calls["factored"] == 1


def test_maml_strided_and_nan_inputs_on_the_factored_route(calls):
    """What users pass through MAML on a network that takes the factored path: a strided
    slice of a larger batch gives the numbers of its contiguous copy; NaN in the data or a
    parameter is refused by name before the op runs."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(BIG[0], BIG[1]), nn.ReLU(), nn.Linear(BIG[1], BIG[2])).double()
    maml = fastmaml.MAML(net, inner_lr=0.1, inner_steps=2, loss="cross_entropy")
    g = torch.Generator().manual_seed(5)
    big = torch.randn(4, 6, BIG[0], generator=g, dtype=torch.float64)
    xs, xq = big[::2, :3], big[1::2, 2:]  # strided views, T = 2
    ys, yq = torch.randint(0, 5, (2, 3), generator=g), torch.randint(0, 5, (2, 4), generator=g)
    assert not xs.is_contiguous()
    a = torch.autograd.grad(maml(xs, ys, xq, yq), list(net.parameters()))
    b = torch.autograd.grad(maml(xs.contiguous(), ys, xq.contiguous(), yq), list(net.parameters()))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert calls["factored"] == 2
    bad = xq.clone()
    bad[1, 0, 7] = float("nan")
    with pytest.raises(ValueError, match="xq"):
        maml(xs, ys, bad, yq)
    with torch.no_grad():
        net[2].bias[0] = float("inf")
    with pytest.raises(ValueError, match="2.bias"):
        maml(xs, ys, xq, yq)
    assert calls["factored"] == 2
