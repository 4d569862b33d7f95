"""A once-differentiable backward whose second differentiation raises clearly."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def once_differentiable(backward: Callable[..., tuple], message: str) -> Callable[..., tuple]:
    """Like ``torch.autograd.function.once_differentiable``: run the backward without a
    graph; when the caller asked for a graph (create_graph=True), return gradients whose
    own backward raises a RuntimeError with a clear message (torch's decorator does this
    only when the incoming gradient requires grad, which ``autograd.grad(...,
    create_graph=True)`` of a scalar does not, leaving a confusing error later)."""

    def wrapper(ctx: Any, *args: Any) -> tuple:
        with torch.no_grad():
            out = backward(ctx, *args)
        if not torch.is_grad_enabled():
            return out
        live = [i for i, o in enumerate(out) if isinstance(o, torch.Tensor)]
        if not live:
            return out
        # Tie the error node to the differentiable inputs (× 0) so that a later
        # autograd.grad(..., inputs) reaches it instead of reporting "unused".
        anchors = [t for t in ctx.saved_tensors if t.requires_grad and t.numel()]
        zero = sum(t.reshape(-1)[0] for t in anchors) * 0 if anchors else None
        err = torch._C._functions.DelayedError(message.encode(), len(live))
        wrapped = err(*[out[i].detach().requires_grad_(True) if zero is None else out[i].detach() + zero
                        for i in live])
        if isinstance(wrapped, torch.Tensor):
            wrapped = (wrapped,)
        res = list(out)
        for i, w in zip(live, wrapped):
            res[i] = w
        return tuple(res)

    return wrapper
