"""Case 4: a missing task dimension (``xs`` of shape [10, 1] for one task) is refused
with a message that names the task dimension and the fix (it ran as 10 tasks of one
point; other shapes gave a misleading support-points mismatch)."""

from __future__ import annotations

import pytest
import torch

import fastmaml
from reliab_paths import F64, PATHS, build

_VEC = [p for p in PATHS if p != "generic_conv_bn"]


@pytest.mark.parametrize("shape", [(10, 1), (10, 2)])
@pytest.mark.parametrize("path", _VEC)
def test_one_task_without_its_task_dimension_is_refused(path, shape):
    m, _, _ = build(path)
    xs = torch.randn(*shape, dtype=F64)
    ys = torch.randn(10, 1, dtype=F64)
    with pytest.raises(ValueError, match=r"xs must be \[T, N, \.\.\.\].*task dimension.*unsqueeze\(0\)"):
        m(xs, ys, xs, ys)
    with pytest.raises(ValueError, match=r"xs must be \[T, N, \.\.\.\].*task dimension"):
        m.adapt(xs, ys)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_functional_one_task_without_its_task_dimension_is_refused(backend):
    params = {"w": torch.randn(1, 1, dtype=F64, requires_grad=True)}
    xs = torch.randn(10, 1, dtype=F64)
    with pytest.raises(ValueError, match=r"task dimension"):
        fastmaml.maml_loss(lambda p, x: x @ p["w"].T, params, 0.1, xs, xs, xs, xs, steps=1, backend=backend)


@pytest.mark.parametrize("path", _VEC)
def test_with_the_task_dimension_it_runs(path):
    m, _, _ = build(path)
    xs = torch.randn(1, 10, 1, dtype=F64)
    assert torch.isfinite(m(xs, xs, xs, xs))
