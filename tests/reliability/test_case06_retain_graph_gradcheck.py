"""Case 6: on the generic path ``backward(retain_graph=True)`` twice, and
``torch.autograd.gradcheck`` of a conv net's meta-loss in float64, work (both raised
``AttributeError: 'NoneType' object has no attribute 'phi'``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastmaml

from reliab_paths import F64, build

_GENERIC = ["generic_vmap", "generic_loop", "generic_one_task_at_a_time", "generic_conv_bn"]


@pytest.mark.parametrize("path", _GENERIC)
def test_retain_graph_backward_twice_accumulates_twice(path):
    m, data, _ = build(path)
    loss = m(*data)
    loss.backward(retain_graph=True)
    g1 = [p.grad.clone() for p in m.model.parameters()]
    loss.backward()
    for a, p in zip(g1, m.model.parameters()):
        torch.testing.assert_close(p.grad, 2 * a, rtol=1e-12, atol=1e-14)


def small_conv_bn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.BatchNorm2d(1, track_running_stats=False), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16, 1)).to(F64)


@pytest.mark.parametrize("task_threads,fast_mode", [("auto", False), (1, True)])
def test_gradcheck_of_a_conv_net_meta_loss(task_threads, fast_mode):
    # second order: the first-order meta-gradient is by definition not the derivative of M
    model = small_conv_bn()
    names = [n for n, _ in model.named_parameters()]
    g = torch.Generator().manual_seed(5)
    xs, xq = (torch.randn(2, 3, 1, 4, 4, generator=g, dtype=F64) for _ in range(2))
    ys, yq = (torch.randn(2, 3, 1, generator=g, dtype=F64) for _ in range(2))
    lr = torch.tensor(0.1, dtype=F64, requires_grad=True)

    def meta_loss(lr_, *ps):
        return fastmaml.maml_loss(model, dict(zip(names, ps)), lr_, xs, ys, xq, yq,
                                          steps=2, task_threads=task_threads)

    params = tuple(p.detach().clone().requires_grad_(True) for p in model.parameters())
    assert torch.autograd.gradcheck(meta_loss, (lr, *params), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=fast_mode)


def test_gradcheck_of_the_maml_module_on_a_conv_net():
    m = fastmaml.MAML(small_conv_bn(), inner_lr=0.1, inner_steps=1, lr_mode="per_step_layer", learn_lr=True)
    _, data, _ = build("generic_conv_bn")

    def meta_loss(*_):
        return m(*data)

    assert torch.autograd.gradcheck(meta_loss, tuple(m.parameters()), eps=1e-6, atol=1e-6, rtol=1e-4)
