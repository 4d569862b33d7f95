"""Case 8: freezing a parameter after building ``MAML`` (``requires_grad_(False)``)
works when the user never passed ``adapt`` (it raised "adapt names unknown
parameters"): the frozen tensor is held fixed, as if MAML had been built after the
freeze; a frozen tensor the user did name in ``adapt`` is refused with a clear error."""

from __future__ import annotations

import pytest
import torch

import fastmaml
from reliab_paths import PATHS, build


@pytest.mark.parametrize("lr_mode", ["scalar", "per_element", "per_step_layer"])
@pytest.mark.parametrize("path", list(PATHS))
def test_freezing_after_build_matches_building_after_the_freeze(path, lr_mode):
    m, data, _ = build(path, lr_mode=lr_mode)
    first = next(m.model.parameters())
    first.requires_grad_(False)
    loss = m(*data)
    loss.backward()
    assert first.grad is None
    fresh, _, _ = build(path, lr_mode=lr_mode)
    next(fresh.model.parameters()).requires_grad_(False)
    want = fresh(*data)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
    for a, b in zip(m.model.parameters(), fresh.model.parameters()):
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12)


def test_freezing_a_named_adapted_parameter_says_so():
    m, data, _ = build("generic_vmap", adapt=["2.weight", "2.bias"])
    m.model[2].weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"'2.weight'.*frozen.*after MAML was built"):
        m(*data)


@pytest.mark.parametrize("path", ["fused_mlp", "generic_vmap"])
def test_freezing_every_parameter_is_refused(path):
    m, data, _ = build(path)
    for p in m.model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        m(*data)
