"""MAML++ derivative-order annealing: MAML(first_order_until=E) runs first order for
outer steps 0..E-1 and second order from step E; evaluation calls do not count."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastmaml


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1)).double()


def batch():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return r(3, 5, 2), r(3, 5, 1), r(3, 6, 2), r(3, 6, 1)


def meta_grad(maml, data):
    maml.model.zero_grad(set_to_none=True)
    maml(*data).backward()
    return torch.cat([p.grad.reshape(-1) for p in maml.model.parameters()])


@pytest.mark.parametrize("where", ["fused_mlp", "generic"])
def test_switches_to_second_order_after_e_outer_steps(where):
    data = batch()
    kw = dict(inner_lr=0.3, inner_steps=3)
    first = meta_grad(fastmaml.MAML(mlp(), first_order=True, **kw), data)
    second = meta_grad(fastmaml.MAML(mlp(), first_order=False, **kw), data)
    assert (first - second).abs().max() > 1e-4  # the orders differ visibly here
    maml = fastmaml.MAML(mlp(), first_order_until=2, **kw)
    if where == "generic":  # an ANIL-like subset (given at construction): not the fused MLP route
        names = list(maml.adapt_names)[:-1]
        maml = fastmaml.MAML(mlp(), first_order_until=2, adapt=names, **kw)
        first = meta_grad(fastmaml.MAML(mlp(), first_order=True, adapt=names, **kw), data)
        second = meta_grad(fastmaml.MAML(mlp(), adapt=names, **kw), data)
    got = []
    for step in range(4):
        if step == 1:  # evaluation calls in between neither count nor switch
            with torch.no_grad():
                maml(*data)
            maml.eval()
            maml(*data)
            maml.train()
        got.append(meta_grad(maml, data))
    assert maml.path.startswith("fused") == (where == "fused_mlp")
    assert maml.outer_steps == 4
    assert torch.allclose(got[0], first, atol=1e-12, rtol=0) and torch.allclose(got[1], first, atol=1e-12, rtol=0)
    assert torch.allclose(got[2], second, atol=1e-12, rtol=0) and torch.allclose(got[3], second, atol=1e-12, rtol=0)


def test_schedule_callable_and_resume():
    data = batch()
    kw = dict(inner_lr=0.3, inner_steps=2)
    first = meta_grad(fastmaml.MAML(mlp(), first_order=True, **kw), data)
    second = meta_grad(fastmaml.MAML(mlp(), **kw), data)
    seen = []
    maml = fastmaml.MAML(mlp(), first_order_until=lambda s: seen.append(s) or s % 2 == 1, **kw)
    g = [meta_grad(maml, data) for _ in range(3)]
    assert seen == [0, 1, 2]
    assert torch.allclose(g[0], second, atol=1e-12, rtol=0) and torch.allclose(g[1], first, atol=1e-12, rtol=0)
    maml2 = fastmaml.MAML(mlp(), first_order_until=5, **kw)
    maml2.outer_steps = 5  # resumed past E: second order at once
    assert torch.allclose(meta_grad(maml2, data), second, atol=1e-12, rtol=0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="first_order=False"):
        fastmaml.MAML(mlp(), first_order=True, first_order_until=3)
    with pytest.raises(ValueError, match=">= 0"):
        fastmaml.MAML(mlp(), first_order_until=-1)
    with pytest.raises(TypeError, match="first_order_until"):
        fastmaml.MAML(mlp(), first_order_until="10")
    maml = fastmaml.MAML(mlp(), first_order_until=lambda s: 1)
    with pytest.raises(TypeError, match="must return a bool"):
        maml(*batch())
