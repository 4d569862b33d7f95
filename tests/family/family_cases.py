"""Small float64 networks and meta-batches for the family tests."""

from __future__ import annotations

import torch
from torch import nn


def mlp(act: type = nn.Tanh, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 6), act(), nn.Linear(6, 2)).double()


def conv_bn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2, track_running_stats=False), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2 * 2 * 2, 3)).double()


def regression_batch(T: int = 3, ns: int = 6, nq: int = 7, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return r(T, ns, 3), r(T, ns, 2), r(T, nq, 3), r(T, nq, 2)


def image_batch(T: int = 3, ns: int = 6, nq: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(T, ns, 1, 4, 4, generator=g, dtype=torch.float64)
    xq = torch.randn(T, nq, 1, 4, 4, generator=g, dtype=torch.float64)
    ys = torch.randint(0, 3, (T, ns), generator=g)
    yq = torch.randint(0, 3, (T, nq), generator=g)
    return xs, ys, xq, yq


def pure(model: nn.Module):
    return lambda p, x: torch.func.functional_call(model, p, (x,))


def max_err(a: dict, b: dict) -> float:
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def grads_of(model: nn.Module) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def zero_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None
