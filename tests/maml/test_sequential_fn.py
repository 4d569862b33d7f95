"""fastmaml.maml.sequential_fn: the direct per-layer call of a plain nn.Sequential gives
the numbers of ``functional_call`` (and, with ``fused_bn``, of ``functional_call`` under the
fused-BatchNorm mode) to first and second order, on the inputs users pass; every model
whose module call is not that computation keeps ``functional_call``."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastmaml
from fastmaml.maml import tasks
from fastmaml.maml.batch_norm_mode import FusedBatchNorm
from fastmaml.maml.sequential_fn import SequentialFn, sequential_fn


def _omniglot(c_in=1, width=8, n_cls=5, hw=13):
    torch.manual_seed(0)
    layers = []
    for i in range(2):
        layers += [nn.Conv2d(c_in if i == 0 else width, width, 3, stride=2, padding=1),
                   nn.BatchNorm2d(width, track_running_stats=False), nn.ReLU()]
    side = (hw + 1) // 2
    side = (side + 1) // 2
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(width * side * side, n_cls))


def _pooled():  # miniImageNet-like: MaxPool, nested Sequential, no conv bias, BN without affine
    torch.manual_seed(1)
    block = lambda i, o: nn.Sequential(nn.Conv2d(i, o, 3, padding="same", bias=False),  # noqa: E731
                                       nn.BatchNorm2d(o, affine=False, track_running_stats=False), nn.ReLU(),
                                       nn.MaxPool2d(2, ceil_mode=True))
    return nn.Sequential(block(3, 6), block(6, 6), nn.Flatten(), nn.Identity(), nn.Linear(6 * 3 * 3, 4))


def _eval_bn():  # running statistics in eval mode, a reflect-padded conv
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
                        nn.Flatten(1), nn.Linear(4 * 9 * 9, 3))
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    return net.eval()


MODELS = {"omniglot": (_omniglot, (6, 1, 13, 13)), "pooled": (_pooled, (5, 3, 9, 9)), "eval_bn": (_eval_bn, (4, 3, 9, 9))}


def _input(shape, layout, seed=3):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        return torch.cat([x, x], dim=-1)[..., ::2]  # every other column: a non-contiguous view
    return x


def _levels(f, params, x):
    """The output, its gradient and a second-order term (d/dθ of g · g)."""
    ps = list(params.values())
    out = f(params, x)
    g = torch.autograd.grad(out.square().sum(), ps, create_graph=True)
    gg = torch.autograd.grad(sum((gi * gi).sum() for gi in g), ps, allow_unused=True)
    return [out, *g, *[torch.zeros_like(p) if t is None else t for t, p in zip(gg, ps)]]


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("fused", [False, True])
def test_same_as_functional_call(name, layout, fused):
    build, shape = MODELS[name]
    net = build().double()
    fn = sequential_fn(net, tasks.channels_last_safe(net))
    assert isinstance(fn, SequentialFn)
    assert isinstance(tasks.module_fn(net), SequentialFn)
    params = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}
    x = _input(shape, layout)
    before = x.clone()

    def module_call(p, x):
        if fused:
            with FusedBatchNorm():
                return torch.func.functional_call(net, p, (x,))
        return torch.func.functional_call(net, p, (x,))

    got = _levels(lambda p, x: fn.run(p, x, fused), params, x)
    want = _levels(module_call, params, x)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.equal(x, before)


def test_frozen_parameter_and_nan():
    net = _omniglot().double()
    net[-1].bias.requires_grad_(False)
    net[0].weight.requires_grad_(False)
    fn = tasks.module_fn(net)
    assert isinstance(fn, SequentialFn)
    params = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters() if v.requires_grad}
    x = _input((3, 1, 13, 13), "contiguous")
    x[1, 0, 2, 2] = float("nan")
    got, want = fn(params, x), torch.func.functional_call(net, params, (x,))
    torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)
    assert torch.isnan(got).all()  # through the batch statistics the NaN reaches every output
    x[1, 0, 2, 2] = 0.0
    without_bias = fn(params, x)
    with torch.no_grad():
        net[-1].bias.add_(1.0)  # the frozen bias is read from the module
    torch.testing.assert_close(fn(params, x), torch.func.functional_call(net, params, (x,)), rtol=0, atol=0)
    torch.testing.assert_close(fn(params, x), without_bias + 1.0, rtol=1e-12, atol=1e-12)


class _MyConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


def _weight_norm(net):
    torch.nn.utils.parametrizations.weight_norm(net[0])
    return net


def _shared(net):
    net[3].weight = net[0].weight  # one parameter in two layers (shapes match: width 8 -> 8)
    return net


def _extra(net):
    net.register_parameter("scale", nn.Parameter(torch.ones(1)))
    return net


NOT_TAKEN = {
    "subclass": lambda: nn.Sequential(_MyConv(1, 2, 3), nn.Flatten(), nn.Linear(2 * 11 * 11, 2)),
    "dropout": lambda: nn.Sequential(nn.Flatten(), nn.Dropout(0.0), nn.Linear(169, 2)),
    "running_stats_in_training": lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)),
    "pool_indices": lambda: nn.Sequential(nn.MaxPool2d(2, return_indices=True)),
    "weight_norm": lambda: _weight_norm(_omniglot()),
    "shared": lambda: _shared(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.ReLU(),
                                            nn.Conv2d(8, 8, 3, padding=1))),
    "extra_parameter": lambda: _extra(_omniglot()),
    "not_sequential": lambda: nn.Conv2d(1, 2, 3),
}


@pytest.mark.parametrize("name", list(NOT_TAKEN))
def test_not_taken(name):
    net = NOT_TAKEN[name]()
    assert sequential_fn(net, False) is None
    assert not isinstance(tasks.module_fn(net), SequentialFn)


@pytest.mark.parametrize("where", ["forward_pre", "forward", "global"])
def test_hooks_keep_the_module_call(where):
    net = _omniglot()
    calls = []
    hook = lambda *a: calls.append(1)  # noqa: E731
    if where == "forward_pre":
        h = net[1].register_forward_pre_hook(hook)
    elif where == "forward":
        h = net[4].register_forward_hook(hook)
    else:
        h = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        fn = tasks.module_fn(net)
        assert not isinstance(fn, SequentialFn)
        fn(dict(net.named_parameters()), torch.randn(2, 1, 13, 13))
        assert calls  # the hook ran
    finally:
        h.remove()
    assert isinstance(tasks.module_fn(net), SequentialFn)


def _meta(net, batch, order, monkeypatch=None, direct=True, **kw):
    m = fastmaml.MAML(net, inner_lr=0.3, inner_steps=2, first_order=order == "first", loss="cross_entropy", **kw)
    if not direct:
        monkeypatch.setattr(tasks, "sequential_fn", lambda *a: None)
    loss = m(*batch)
    loss.backward()
    if not direct:
        monkeypatch.undo()
    return loss.detach(), [p.grad.clone() for p in net.parameters()], m.path


@pytest.mark.parametrize("order", ["first", "second"])
@pytest.mark.parametrize("task_threads", [1, 2])
def test_maml_agrees(order, task_threads, monkeypatch):
    """The MAML layer on the direct call: bitwise the numbers of functional_call, and the
    reference backend's, for a channels-last-strided meta-batch of odd-sized images."""
    g = torch.Generator().manual_seed(4)
    T, Ns, Nq = 3, 5, 7
    xs = torch.randn(T, Ns, 1, 13, 13, generator=g, dtype=torch.float64)
    xq = torch.randn(T, Nq, 1, 13, 13, generator=g, dtype=torch.float64)
    ys = torch.randint(0, 5, (T, Ns), generator=g)
    yq = torch.randint(0, 5, (T, Nq), generator=g)
    batch = (xs[:, :, :, :, :], ys, xq.transpose(-1, -2).contiguous().transpose(-1, -2), yq)
    net = _omniglot().double()
    runs = [_meta(copy.deepcopy(net), batch, order, monkeypatch, direct=d, task_threads=task_threads)
            for d in (True, False)]
    (l1, g1, p1), (l0, g0, p0) = runs
    assert p1 == p0 == "generic"
    assert torch.equal(l1, l0) and all(torch.equal(a, b) for a, b in zip(g1, g0))
    lr, gr, pr = _meta(copy.deepcopy(net), batch, order, backend="reference")
    assert pr == "reference"
    torch.testing.assert_close(l1, lr, rtol=1e-10, atol=1e-12)
    for a, b in zip(g1, gr):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
