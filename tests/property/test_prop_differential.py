"""Differential test: for random models from a small grammar (Linear, Conv, BatchNorm
with batch statistics, GroupNorm, LayerNorm, activations, pooling, residual blocks),
every path ``MAML`` may pick agrees with ``backend="reference"`` — or raises one of the
documented errors (a ``ValueError`` whose message is in ``DOCUMENTED``, see the README's
"Limits and errors"). A path may never be silently wrong nor fail with a torch-internal
error."""

from __future__ import annotations

import copy

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fastmaml
from prop_util import assert_all_close, assert_close, seeds

F64 = torch.float64

# Fragments of the documented refusals (README "Limits and errors").
DOCUMENTED = ("task_map='loop'", 'task_map="loop"')

ACTS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "elu": nn.ELU, "softplus": nn.Softplus,
        "leaky_relu": nn.LeakyReLU}


class Residual(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


@st.composite
def image_models(draw):
    """[C, H, W] inputs -> a Sequential of conv blocks, then Flatten + Linear."""
    c = draw(st.integers(1, 2))
    h = draw(st.integers(3, 6))
    shape = (c, h, h)
    layers: list[nn.Module] = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["conv", "bn", "gn", "ln", "act", "pool", "residual"]))
        C, H, W = shape
        if kind == "conv":
            out = draw(st.integers(1, 3))
            layers.append(nn.Conv2d(C, out, 3, padding=1, bias=draw(st.booleans())))
            shape = (out, H, W)
        elif kind == "bn":
            layers.append(nn.BatchNorm2d(C, track_running_stats=False))
        elif kind == "gn":
            layers.append(nn.GroupNorm(draw(st.sampled_from([1, C])), C))
        elif kind == "ln":
            layers.append(nn.LayerNorm([C, H, W]))
        elif kind == "act":
            layers.append(ACTS[draw(st.sampled_from(sorted(ACTS)))]())
        elif kind == "pool" and H >= 2:
            layers.append(draw(st.sampled_from([nn.MaxPool2d, nn.AvgPool2d]))(2))
            shape = (C, H // 2, W // 2)
        elif kind == "residual":
            layers.append(Residual(nn.Sequential(nn.Conv2d(C, C, 3, padding=1), nn.Tanh())))
    C, H, W = shape
    layers += [nn.Flatten(), nn.Linear(C * H * W, draw(st.integers(1, 3)))]
    return nn.Sequential(*layers), (c, h, h)


@st.composite
def vector_models(draw):
    d = draw(st.integers(1, 4))
    width = d
    layers: list[nn.Module] = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["linear", "bn", "ln", "act", "residual"]))
        if kind == "linear":
            out = draw(st.integers(1, 6))
            layers.append(nn.Linear(width, out, bias=draw(st.booleans())))
            width = out
        elif kind == "bn":
            layers.append(nn.BatchNorm1d(width, track_running_stats=False))
        elif kind == "ln":
            layers.append(nn.LayerNorm(width))
        elif kind == "act":
            layers.append(ACTS[draw(st.sampled_from(sorted(ACTS)))]())
        else:
            layers.append(Residual(nn.Sequential(nn.Linear(width, width), nn.Tanh())))
    layers.append(nn.Linear(width, draw(st.integers(1, 3))))
    return nn.Sequential(*layers), (d,)


# Every knob of the generic path a user may set, and the defaults.
VARIANTS = {
    "auto": {},
    "vmap": {"task_map": "vmap"},
    "loop": {"task_map": "loop"},
    "loop_one_task": {"task_map": "loop", "task_threads": 1},
    "loop_rev_rev": {"task_map": "loop", "hvp": "rev_rev"},
    "loop_torch_bn": {"task_map": "loop", "fused_batch_norm": False},
    "loop_recompute": {"task_map": "loop", "graph_memory_mb": 0.0},
}


def _run(maml, data):
    maml.zero_grad()
    loss = maml(*data)
    loss.backward()
    return loss.detach(), [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in maml.parameters()]


@settings(max_examples=2 * settings.default.max_examples)
@given(model=st.one_of(image_models(), vector_models()), seed=seeds(), T=st.integers(1, 3), N=st.integers(2, 4),
       K=st.integers(1, 2), first_order=st.booleans(), lr_mode=st.sampled_from(["scalar", "per_element"]))
def test_every_path_agrees_with_the_reference_or_refuses_clearly(model, seed, T, N, K, first_order, lr_mode):
    net, point = model
    torch.manual_seed(seed % 10_000)
    net = net.to(F64)
    for p in net.parameters():  # init from the seed (the strategy builds the modules)
        nn.init.normal_(p, std=0.4)
    g = torch.Generator().manual_seed(seed)
    out = net(torch.zeros(2, *point, dtype=F64)).shape[-1]
    data = [torch.randn(T, N, *point, generator=g, dtype=F64), torch.randn(T, N, out, generator=g, dtype=F64),
            torch.randn(T, N, *point, generator=g, dtype=F64), torch.randn(T, N, out, generator=g, dtype=F64)]
    kw = dict(inner_lr=0.05, inner_steps=K, first_order=first_order, lr_mode=lr_mode, learn_lr=True)
    want = _run(fastmaml.MAML(copy.deepcopy(net), backend="reference", **kw), data)
    for name, attrs in VARIANTS.items():
        maml = fastmaml.MAML(copy.deepcopy(net), **kw)
        for k, v in attrs.items():
            setattr(maml, k, v)
        try:
            got = _run(maml, data)
        except ValueError as e:
            assert any(d in str(e) for d in DOCUMENTED), f"{name}: undocumented error {e}"
            continue
        assert_close(f"{name}: meta-loss", got[0], want[0], 1e-9)
        assert_all_close(f"{name}: meta-gradient", got[1], want[1], 1e-7)
