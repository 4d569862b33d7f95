"""Case 3: a NaN or Inf in a model parameter raises ``params[...] contains NaN or Inf``
on every path (the fused ReLU MLP path masked it: finite loss and gradients), and the
kernels propagate NaN/Inf rather than masking it."""

from __future__ import annotations

import pytest
import torch

from reliab_paths import FAST_PATHS, PATHS, build


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("path", [p for p in PATHS])
def test_nonfinite_parameter_is_refused(path, bad):
    m, data, _ = build(path)
    with torch.no_grad():
        next(m.model.parameters()).view(-1)[0] = bad
    with pytest.raises(ValueError, match=r"contains NaN or Inf"):
        m(*data)
    with pytest.raises(ValueError, match=r"contains NaN or Inf"):
        m.adapt(data[0], data[1])


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_relu_kernels_propagate_nan(backend):
    # the op layer has no finiteness check by contract: NaN must come out as NaN (torch.relu(nan) = nan)
    import fastmaml

    w = [torch.full((1, 3, 1), float("nan"), dtype=torch.float64), torch.ones(1, 1, 3, dtype=torch.float64)]
    b = [torch.zeros(1, 3, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64)]
    x = torch.ones(1, 4, 1, dtype=torch.float64)
    y = torch.zeros(1, 4, 1, dtype=torch.float64)
    loss, gw, gb = fastmaml.ops.mlp_loss_and_grad(w, b, x, y, activation="relu", loss="mse", backend=backend)
    assert torch.isnan(loss).all(), f"backend={backend}: loss {loss} masks the NaN weight"


@pytest.mark.parametrize("path", FAST_PATHS)
def test_nan_in_data_is_refused(path):
    m, data, _ = build(path)
    data[2] = data[2].clone()
    data[2].view(-1)[-1] = float("nan")
    with pytest.raises(ValueError, match=r"xq contains NaN or Inf"):
        m(*data)
