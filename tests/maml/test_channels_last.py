"""Channels-last image tasks on the generic path (fastmaml.maml.dispatch.choose_channels_last,
docs/DESIGN.md §1): which models and inputs take the layout, and that the meta-loss and
meta-gradient agree with the reference backend and do not depend on the input's strides."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastmaml
from fastmaml import _ext
from fastmaml.maml.dispatch import tasks_channels_last
from fastmaml.ops import batch_norm_library as bn_lib

needs_ext = pytest.mark.skipif(_ext._C is None, reason=_ext.IMPORT_ERROR or "extension not built")
F64 = torch.float64


def image_net(in_ch: int = 3, hidden: int = 4, norm: type = nn.BatchNorm2d) -> nn.Sequential:
    """A miniImageNet-like net on 8x8 images: 2 x [conv, norm, ReLU, maxpool] + linear."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    c = in_ch
    for _ in range(2):
        n = norm(hidden, track_running_stats=False) if norm is nn.BatchNorm2d else norm(2, hidden)
        layers += [nn.Conv2d(c, hidden, 3, padding=1), n, nn.ReLU(), nn.MaxPool2d(2)]
        c = hidden
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(hidden * 2 * 2, 3)).double()


def data(in_ch: int = 3, T: int = 3, N: int = 6, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(T, N, in_ch, 8, 8, generator=g, dtype=F64), torch.randint(0, 3, (T, N), generator=g),
            torch.randn(T, N, in_ch, 8, 8, generator=g, dtype=F64), torch.randint(0, 3, (T, N), generator=g)]


def layouts(monkeypatch) -> list[int]:
    """The layouts the fused BatchNorm kernels are called with (0 NCL, 1 channels last)."""
    seen: list[int] = []
    real = bn_lib._nclk
    monkeypatch.setattr(bn_lib, "_nclk", lambda x: seen.append(real(x)[0]) or real(x))
    return seen


def run(net: nn.Module, d: list[torch.Tensor], **kw) -> tuple[torch.Tensor, list[torch.Tensor]]:
    maml = fastmaml.MAML(copy.deepcopy(net), inner_lr=0.1, inner_steps=2, loss="cross_entropy", **kw)
    loss = maml(*d)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in maml.parameters()]


class ViewingConv(nn.Conv2d):
    """A subclass with its own forward (it could view the memory as NCHW)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.view(x.shape))


@needs_ext
@pytest.mark.parametrize("in_ch", [3, 1])
@pytest.mark.parametrize("first_order", [False, True])
def test_channels_last_path_agrees_with_the_reference(first_order, in_ch, monkeypatch):
    net, d = image_net(in_ch=in_ch), data(in_ch=in_ch)
    want = run(net, d, backend="reference", first_order=first_order, lr_mode="per_element", learn_lr=True)
    seen = layouts(monkeypatch)
    got = run(net, d, first_order=first_order, lr_mode="per_element", learn_lr=True)
    assert seen and set(seen) == {1}  # every BatchNorm call ran the channels-last kernels
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    for a, e in zip(got[1], want[1]):
        torch.testing.assert_close(a, e, rtol=1e-8, atol=1e-10)


@needs_ext
@pytest.mark.parametrize("in_ch", [3, 1])
def test_channels_last_results_do_not_depend_on_input_strides(in_ch):
    """A strided slice (the support/query split of one tensor), a contiguous slice at an
    offset, a channels_last input and a contiguous copy give bitwise equal results; the
    user's tensors are not modified."""
    net = image_net(in_ch=in_ch)
    g = torch.Generator().manual_seed(1)
    big = torch.randn(4, 12, in_ch, 8, 8, generator=g, dtype=F64)
    ys, yq = torch.randint(0, 3, (3, 6), generator=g), torch.randint(0, 3, (3, 6), generator=g)
    xs, xq = big[1:, :6], big[1:, 6:]  # strided views
    before = big.clone()
    ref = run(net, [xs.contiguous(), ys, xq.contiguous(), yq])
    strided = run(net, [xs, ys, xq, yq])
    cl = run(net, [tasks_channels_last(xs), ys, tasks_channels_last(xq), yq])  # by strides too
    # contiguous tensors at a storage offset (taken as they are, not copied)
    sliced = run(net, [torch.cat([torch.zeros_like(xs[:1]), xs.contiguous()])[1:], ys,
                       torch.cat([torch.zeros_like(xq[:1]), xq.contiguous()])[1:], yq])
    for other in (strided, cl, sliced):
        assert torch.equal(other[0], ref[0])
        assert all(torch.equal(a, b) for a, b in zip(other[1], ref[1]))
    assert torch.equal(big, before)


@needs_ext
@pytest.mark.parametrize("case", ["group_norm", "custom_forward", "torch_batch_norm", "vmap"])
def test_channels_last_only_where_it_is_safe_and_pays(case, monkeypatch):
    """Models with other layers (GroupNorm; a custom forward), the PyTorch BatchNorm and
    vmap over tasks keep the NCHW layout — and still agree with the reference."""
    net, d, kw = image_net(), data(), {}
    if case == "group_norm":
        net = image_net(norm=nn.GroupNorm)
        net[1] = nn.BatchNorm2d(4, track_running_stats=False).double()  # one fused BatchNorm to observe
    elif case == "custom_forward":
        torch.manual_seed(0)
        net[0] = ViewingConv(3, 4, 3, padding=1).double()
    elif case == "torch_batch_norm":
        kw = {"fused_batch_norm": False}
    else:
        kw = {"task_map": "vmap"}
    want = run(net, d, backend="reference")
    seen = layouts(monkeypatch)
    got = run(net, d, **kw)
    assert 1 not in seen
    if case in ("group_norm", "custom_forward"):
        assert seen  # the fused BatchNorm ran, in the NCL layout
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    for a, e in zip(got[1], want[1]):
        torch.testing.assert_close(a, e, rtol=1e-8, atol=1e-10)


@needs_ext
def test_channels_last_results_do_not_depend_on_the_thread_count():
    net, d = image_net(), data()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = run(net, d, task_threads=1)
        torch.set_num_threads(1)
        one = run(net, d, task_threads=1)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], two[0]) and all(torch.equal(a, b) for a, b in zip(one[1], two[1]))
