"""Case 9: random ops other than ``nn.Dropout`` (``F.dropout``, ``torch.randn_like``)
and data-dependent control flow in ``forward``. Under vmap over tasks they are refused
with a ValueError that names the fix, ``task_map="loop"`` (it was a torch-internal vmap
error); with ``task_map="loop"`` the meta-gradient is exact for the draws the forward
made, whatever ``graph_memory_mb`` (it was silently wrong when the backward recomputed
an inner step with fresh draws)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastmaml
from reliab_paths import F64


class Noisy(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.a = nn.Linear(1, 6).to(F64)
        self.b = nn.Linear(6, 1).to(F64)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if self.kind == "randn_like":
            h = h * (1 + 0.3 * torch.randn_like(h))
        elif self.kind == "dropout":
            h = nn.functional.dropout(h, 0.3, training=True)
        elif self.kind == "control_flow":
            h = h * 2 if h.sum() > 0 else h - 1
        return self.b(h)


def _data():
    g = torch.Generator().manual_seed(4)
    return [torch.randn(3, 5, 1, generator=g, dtype=F64) for _ in range(4)]


@pytest.mark.parametrize("kind", ["randn_like", "dropout", "control_flow"])
def test_vmap_refuses_with_the_loop_advice(kind):
    m = fastmaml.MAML(Noisy(kind), inner_lr=0.1, inner_steps=2)
    with pytest.raises(ValueError, match=r"task_map ?= ?['\"]loop['\"]"):
        m(*_data())


@pytest.mark.parametrize("graph_memory_mb", [0.0, 640.0])
@pytest.mark.parametrize("kind", ["randn_like", "dropout"])
@pytest.mark.parametrize("task_threads", ["auto", 1])
def test_loop_gives_the_exact_gradient_for_the_forward_draws(kind, graph_memory_mb, task_threads):
    # the meta-loss at a fixed seed is a deterministic function of θ: its meta-gradient
    # must match finite differences of it (a backward that redraws does not)
    model = Noisy(kind)
    names = [n for n, _ in model.named_parameters()]
    data = _data()

    def meta_loss(*ps):
        torch.manual_seed(123)
        return fastmaml.maml_loss(model, dict(zip(names, ps)), 0.1, *data,
                                          steps=3, task_map="loop", graph_memory_mb=graph_memory_mb,
                                          task_threads=task_threads)

    params = tuple(p.detach().clone().requires_grad_(True) for p in model.parameters())
    assert torch.autograd.gradcheck(meta_loss, params, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_loop_with_control_flow_agrees_with_the_reference():
    m = fastmaml.MAML(Noisy("control_flow"), inner_lr=0.1, inner_steps=2)
    m.task_map = "loop"
    ref = fastmaml.MAML(Noisy("control_flow"), inner_lr=0.1, inner_steps=2, backend="reference")
    data = _data()
    a, b = m(*data), ref(*data)
    a.backward()
    b.backward()
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for p, q in zip(m.model.parameters(), ref.model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12)


def test_the_vmap_advice_is_in_the_error_of_the_functional_api():
    model = Noisy("randn_like")
    with pytest.raises(ValueError, match=r"task_map ?= ?['\"]loop['\"]"):
        fastmaml.maml_loss(model, dict(model.named_parameters()), 0.1, *_data(), steps=1)
