"""Case 2: a callable loss returning a non-scalar is refused on every path with
"loss must return a scalar" (it was accepted: the reported value its mean, the inner
steps and the meta-gradient used its sum)."""

from __future__ import annotations

import pytest
import torch

import fastmaml
from reliab_paths import PATHS, build


def _elementwise(p, y):
    return (p - y) ** 2


@pytest.mark.parametrize("path", list(PATHS))
def test_non_scalar_loss_is_refused(path):
    m, data, _ = build(path, loss=_elementwise)
    with pytest.raises(ValueError, match="loss must return a scalar"):
        m(*data)
    with pytest.raises(ValueError, match="loss must return a scalar"):
        m.adapt(data[0], data[1])


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_non_scalar_loss_is_refused_functional(backend):
    params = {"w": torch.randn(1, 1, dtype=torch.float64, requires_grad=True)}
    xs, ys, xq, yq = (torch.randn(2, 4, 1, dtype=torch.float64) for _ in range(4))
    with pytest.raises(ValueError, match="loss must return a scalar"):
        fastmaml.maml_loss(lambda p, x: x @ p["w"].T, params, 0.1, xs, ys, xq, yq, steps=1, loss=_elementwise,
                           backend=backend)


def test_scalar_callable_loss_still_works():
    m, data, _ = build("generic_vmap", loss=lambda p, y: ((p - y) ** 2).mean())
    assert torch.isfinite(m(*data))
