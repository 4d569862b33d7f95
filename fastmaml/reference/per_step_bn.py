"""Reference MAML with MAML++'s per-step BatchNorm (:class:`fastmaml.nn.PerStepBatchNorm2d`).

Unrolled autograd over a Python loop of tasks, as :mod:`fastmaml.reference.maml`, with
the step index set before every forward: the support forward at θ_k (k = 0..K−1) runs
at index k, the query forward after k+1 steps at index k (MAML++'s convention).

Running statistics (BNRS), computed here independently of the layer's own recorder: a
forward pre-hook captures the input of every per-step layer at each support forward of
the inner loop; after all tasks, for every step k with captures,

    running_mean[k] ← (1 − m) running_mean[k] + m · mean_t mean(x_{t,k})
    running_var[k]  ← (1 − m) running_var[k]  + m · mean_t var_unbiased(x_{t,k})

over the batch and spatial dimensions, per channel (layers in training mode with
``track_running_stats`` only).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from fastmaml.maml.problem import check_problem
from fastmaml.nn import StepSchedule


def maml_loss(model: nn.Module, params: Mapping[str, torch.Tensor], lrs: object, xs: torch.Tensor,
              ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor, *, steps: int, first_order: bool = False,
              loss: object = "mse", msl_weights: object = None, adapt: Sequence[str] | None = None,
              update_running_stats: bool = True) -> torch.Tensor:
    """M = (1/T) Σ_t Σ_k w_k Lq(θ_{t,k}) of ``model`` with its per-step layers fed the step
    index; arguments as :func:`fastmaml.reference.maml_loss` (``model`` in place of
    ``fn``). Updates the per-step running statistics once, after all tasks, when
    ``update_running_stats``. Differentiable (twice, even) by autograd."""

    def fn(p: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, dict(p), (x,))

    prob = check_problem(fn, params, lrs, xs, ys, xq, yq, steps=steps, first_order=first_order, loss=loss,
                         msl_weights=msl_weights, adapt=adapt)
    sched = StepSchedule(model, prob.steps)
    captured: dict[int, dict[int, list[torch.Tensor]]] = {id(m): {} for m in sched}
    state = {"k": None}

    def capture(mod: nn.Module, args: tuple) -> None:
        if state["k"] is not None:
            captured[id(mod)].setdefault(state["k"], []).append(args[0].detach())

    hooks = [m.register_forward_pre_hook(capture) for m in sched]
    theta = {nm: (p if p.requires_grad else p.detach().requires_grad_(True)) for nm, p in params.items()}
    total = torch.zeros((), dtype=xs.dtype, device=xs.device)
    try:
        with torch.enable_grad():
            for t in range(prob.T):
                p = theta
                for k in range(prob.steps):
                    sched.set_step(k)
                    state["k"] = k
                    ls = prob.loss_fn(fn(p, xs[t]), ys[t])
                    state["k"] = None
                    grads = torch.autograd.grad(ls, [p[nm] for nm in prob.adapted], create_graph=True,
                                                allow_unused=True)
                    p = dict(p)
                    for i, (nm, g) in enumerate(zip(prob.adapted, grads)):
                        g = torch.zeros_like(p[nm]) if g is None else g
                        p[nm] = p[nm] - prob.lr.rate(k, i) * (g.detach() if prob.first_order else g)
                    if prob.msl[k] != 0.0:
                        total = total + prob.msl[k] * prob.loss_fn(fn(p, xq[t]), yq[t])
    finally:
        for h in hooks:
            h.remove()
    if update_running_stats:
        with torch.no_grad():
            for m in sched:
                if not (m.training and m.track_running_stats):
                    continue
                for k, xs_k in captured[id(m)].items():
                    mean = torch.stack([x.mean(dim=(0, 2, 3)) for x in xs_k]).mean(0)
                    var = torch.stack([x.var(dim=(0, 2, 3), unbiased=True) for x in xs_k]).mean(0)
                    m.running_mean[k] = (1 - m.momentum) * m.running_mean[k] + m.momentum * mean
                    m.running_var[k] = (1 - m.momentum) * m.running_var[k] + m.momentum * var
    return total / prob.T
