"""Cases shared by the batch_norm tests: inputs, PyTorch's own F.batch_norm, and every
level of derivative a MAML HVP uses."""

from __future__ import annotations

import torch
import torch.nn.functional as F

F64 = torch.float64
SHAPES = [(4, 3, 5, 5), (6, 2), (3, 4, 7), (2, 3, 2, 3, 2)]


def _native(x, w, b, eps=1e-5):
    return F.batch_norm(x, None, None, w, b, True, 0.1, eps)


def _inputs(shape, dtype=F64, seed=0, mean=0.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=F64) + mean).to(dtype).requires_grad_(True)
    w = torch.randn(shape[1], generator=g, dtype=F64).to(dtype).requires_grad_(True)
    b = torch.randn(shape[1], generator=g, dtype=F64).to(dtype).requires_grad_(True)
    return x, w, b


def _first_and_second(f, x, w, b):
    """Output, the gradient of a nonlinear loss with create_graph, and the gradient of a
    nonlinear function of that gradient: every level a MAML HVP uses."""
    y = f(x, w, b)
    c = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    g = torch.autograd.grad((y.sin() * c).sum(), (x, w, b), create_graph=True)
    s = sum((gi * torch.cos(torch.arange(gi.numel(), dtype=gi.dtype)).view_as(gi)).sum() for gi in g)
    return [y, *g, *torch.autograd.grad(s, (x, w, b))]
