"""Case 10: inputs on another device than the parameters are refused with a message
that says "device" and names both devices on every path (the fused path said
``Tensor.item() cannot be called on meta tensors``); InstanceNorm with running stats in
training mode is refused before anything runs, naming the layer (it was reported only
after its running stats had changed); a negative or zero ``inner_lr`` is refused and a
huge one warned about (they were accepted without a word)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fastmaml
from reliab_paths import F64, PATHS, build

@pytest.mark.parametrize("which", [0, 1, 2, 3])
@pytest.mark.parametrize("path", list(PATHS))
def test_inputs_on_another_device_name_both_devices(path, which):
    m, data, _ = build(path)
    data[which] = data[which].to("meta")
    with pytest.raises(ValueError, match=r"(?s)device.*(cpu.*meta|meta.*cpu)"):
        m(*data)


def _inorm_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.InstanceNorm2d(2, track_running_stats=True),
                         nn.Flatten(), nn.Linear(32, 1)).to(F64)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_instance_norm_with_running_stats_is_refused_up_front(backend):
    net = _inorm_net()
    with pytest.raises(ValueError, match=r"InstanceNorm2d layer '1'.*running"):
        fastmaml.MAML(net, inner_steps=1, backend=backend)
    before = net[1].running_mean.clone()
    xs = torch.randn(2, 3, 1, 4, 4, dtype=F64)
    ys = torch.randn(2, 3, 1, dtype=F64)
    with pytest.raises(ValueError, match=r"InstanceNorm2d layer '1'.*running"):
        fastmaml.maml_loss(net, dict(net.named_parameters()), 0.1, xs, ys, xs, ys, steps=1, backend=backend)
    assert torch.equal(net[1].running_mean, before)


def test_instance_norm_in_eval_mode_or_without_stats_is_fine():
    net = _inorm_net().eval()
    fastmaml.MAML(net, inner_steps=1)
    fastmaml.MAML(nn.Sequential(nn.InstanceNorm2d(1), nn.Flatten(), nn.Linear(16, 1)).to(F64), inner_steps=1)


@pytest.mark.parametrize("lr", [-0.1, 0.0])
def test_non_positive_inner_lr_is_refused(lr):
    with pytest.raises(ValueError, match=r"inner_lr must be a finite float > 0"):
        build("fused_mlp", inner_lr=lr)


@pytest.mark.parametrize("lr", [-0.1, 0.0])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_non_positive_fixed_lrs_are_refused_functional(lr, backend):
    params = {"w": torch.randn(1, 1, dtype=F64, requires_grad=True)}
    xs = torch.randn(2, 4, 1, dtype=F64)
    with pytest.raises(ValueError, match=r"> 0"):
        fastmaml.maml_loss(lambda p, x: x @ p["w"].T, params, lr, xs, xs, xs, xs, steps=1, backend=backend)


def test_huge_inner_lr_is_warned_about():
    with pytest.warns(UserWarning, match=r"inner_lr=1e\+30 is very large"):
        build("fused_mlp", inner_lr=1e30)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build("fused_mlp", inner_lr=0.5)
