"""Case 5: the fused MLP path keeps autograd's contract: a second ``backward()``
without ``retain_graph`` raises (it silently doubled ``.grad``), and a parameter
modified in place between forward and backward raises the version-counter error (it
gave the gradient at the old values)."""

from __future__ import annotations

import pytest
import torch

from reliab_paths import FAST_PATHS, build

_FUSED = {"fused_mlp", "mlp_layerwise"}


@pytest.mark.parametrize("path", [p for p in FAST_PATHS])
def test_second_backward_without_retain_graph_raises(path):
    m, data, _ = build(path)
    loss = m(*data)
    loss.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


@pytest.mark.parametrize("path", [p for p in FAST_PATHS])
def test_in_place_edit_between_forward_and_backward_raises(path):
    m, data, _ = build(path)
    loss = m(*data)
    with torch.no_grad():
        next(m.model.parameters()).mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("path", sorted(_FUSED))
def test_retain_graph_backward_twice_accumulates_twice(path):
    # (the generic paths: test_case06)
    m, data, _ = build(path)
    loss = m(*data)
    loss.backward(retain_graph=True)
    g1 = [p.grad.clone() for p in m.model.parameters()]
    loss.backward()
    for a, p in zip(g1, m.model.parameters()):
        torch.testing.assert_close(p.grad, 2 * a, rtol=0, atol=0)
