"""Reference Reptile (Nichol et al. 2018): a plain loop over tasks.

Per task: K steps of plain SGD on the support loss from φ_0 = θ,
φ_{k+1} = φ_k − α ∇Ls(φ_k) (``torch.autograd.grad``, no graph). The meta-update
direction is θ − (1/T) Σ_t φ_{t,K} (plain Reptile: θ ← θ − ε · direction); the reported
loss is the mean over tasks of the support loss at φ_{t,K}.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from fastmaml.maml.problem import check_meta_batch, resolve_loss

PureFn = Callable[[dict, torch.Tensor], torch.Tensor]


def reptile_direction(fn: PureFn, params: Mapping[str, torch.Tensor], xs: torch.Tensor, ys: torch.Tensor, *,
                      inner_lr: float, inner_steps: int, loss: object = "mse"
                      ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(direction θ − mean_t φ_{t,K} as dict name -> tensor, mean_t Ls_t(φ_{t,K}) 0-d)."""
    loss_name, loss_fn = resolve_loss(loss)
    names = list(params)
    theta = [params[n].detach() for n in names]
    T = check_meta_batch(xs, ys, xs, ys, loss_name=loss_name, dtype=theta[0].dtype, device=theta[0].device)
    acc = [torch.zeros_like(t) for t in theta]
    total = torch.zeros((), dtype=theta[0].dtype, device=theta[0].device)
    for t in range(T):
        phi = [p.clone() for p in theta]
        for _ in range(inner_steps):
            leaves = [p.detach().requires_grad_(True) for p in phi]
            with torch.enable_grad():
                ls = loss_fn(fn(dict(zip(names, leaves)), xs[t]), ys[t])
                g = torch.autograd.grad(ls, leaves, allow_unused=True)
            phi = [(p - inner_lr * (torch.zeros_like(p) if gi is None else gi)).detach() for p, gi in zip(leaves, g)]
        with torch.no_grad():
            total = total + loss_fn(fn(dict(zip(names, phi)), xs[t]), ys[t])
        for a, p in zip(acc, phi):
            a += p
    direction = {n: th - a / T for n, th, a in zip(names, theta, acc)}
    return direction, total / T
