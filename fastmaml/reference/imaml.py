"""Reference iMAML: the implicit meta-gradient by an explicit Hessian and a dense solve.

A Python loop over tasks. Per task: K plain gradient steps on the proximal support
objective Ls(φ) + (λ/2)‖φ − θ‖² from φ_0 = θ (``torch.autograd.grad``, no graph), the
query loss and its gradient at φ_K, the full Hessian H of Ls at φ_K over the flattened
parameters (``torch.autograd.functional.hessian``), and the exact solution of

    (I + H/λ) g_t = ∇Lq(φ_K)

by ``torch.linalg.solve``. The meta-gradient is (1/T) Σ_t g_t. O(P²) memory and O(P³)
time in the parameter count P: for small networks in float64, as the ground truth the
fast path (:mod:`fastmaml.family.imaml`, CG on HVPs) is tested against.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from fastmaml.maml.problem import check_meta_batch, resolve_loss

PureFn = Callable[[dict, torch.Tensor], torch.Tensor]


def _flat(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def _unflat(v: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    out, i = [], 0
    for t in like:
        out.append(v[i:i + t.numel()].view_as(t))
        i += t.numel()
    return out


def _adapt_task(fn: PureFn, names: list[str], theta: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                loss_fn: Callable, lr: float, steps: int, lam: float) -> list[torch.Tensor]:
    phi = [t.detach().clone() for t in theta]
    for _ in range(steps):
        leaves = [p.requires_grad_(True) for p in phi]
        with torch.enable_grad():
            ls = loss_fn(fn(dict(zip(names, leaves)), x), y)
            g = torch.autograd.grad(ls, leaves, allow_unused=True)
        phi = [(p - lr * ((torch.zeros_like(p) if gi is None else gi) + lam * (p - t))).detach()
               for p, gi, t in zip(leaves, g, theta)]
    return phi


def adapt(fn: PureFn, params: Mapping[str, torch.Tensor], xs: torch.Tensor, ys: torch.Tensor, *,
          inner_lr: float, inner_steps: int, lam: float, loss: object = "mse") -> dict[str, torch.Tensor]:
    """φ_{t,K} of every task, dict name -> [T, *shape] (detached)."""
    loss_name, loss_fn = resolve_loss(loss)
    names = list(params)
    theta = [params[n].detach() for n in names]
    check_meta_batch(xs, ys, xs, ys, loss_name=loss_name, dtype=theta[0].dtype, device=theta[0].device)
    per = [_adapt_task(fn, names, theta, xs[t], ys[t], loss_fn, inner_lr, inner_steps, lam)
           for t in range(xs.shape[0])]
    return {n: torch.stack([p[i] for p in per]) for i, n in enumerate(names)}


def imaml_grad(fn: PureFn, params: Mapping[str, torch.Tensor], xs: torch.Tensor, ys: torch.Tensor,
               xq: torch.Tensor, yq: torch.Tensor, *, inner_lr: float, inner_steps: int, lam: float,
               loss: object = "mse") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(meta-loss (1/T) Σ_t Lq_t(φ_{t,K}), exact implicit meta-gradient dict name -> tensor)."""
    loss_name, loss_fn = resolve_loss(loss)
    names = list(params)
    theta = [params[n].detach() for n in names]
    T = check_meta_batch(xs, ys, xq, yq, loss_name=loss_name, dtype=theta[0].dtype, device=theta[0].device)
    total = torch.zeros((), dtype=theta[0].dtype, device=theta[0].device)
    grad = torch.zeros_like(_flat(theta))
    for t in range(T):
        phi = _adapt_task(fn, names, theta, xs[t], ys[t], loss_fn, inner_lr, inner_steps, lam)
        leaves = [p.requires_grad_(True) for p in phi]
        with torch.enable_grad():
            lq = loss_fn(fn(dict(zip(names, leaves)), xq[t]), yq[t])
            gq = torch.autograd.grad(lq, leaves, allow_unused=True)
        b = _flat([torch.zeros_like(p) if g is None else g for p, g in zip(phi, gq)])

        def support_loss(v: torch.Tensor, t: int = t) -> torch.Tensor:
            return loss_fn(fn(dict(zip(names, _unflat(v, phi))), xs[t]), ys[t])

        H = torch.autograd.functional.hessian(support_loss, _flat(phi).detach())
        A = torch.eye(H.shape[0], dtype=H.dtype, device=H.device) + H / lam
        grad += torch.linalg.solve(A, b)
        total = total + lq.detach()
    grad /= T
    return total / T, dict(zip(names, _unflat(grad, theta)))


def imaml_loss(fn: PureFn, params: Mapping[str, torch.Tensor], xs: torch.Tensor, ys: torch.Tensor,
               xq: torch.Tensor, yq: torch.Tensor, *, inner_lr: float, inner_steps: int, lam: float,
               loss: object = "mse") -> torch.Tensor:
    """The meta-loss as a 0-d tensor whose value is (1/T) Σ_t Lq_t(φ_{t,K}) and whose
    gradient in each params tensor is the exact implicit meta-gradient (a surrogate:
    value + Σ_i ⟨θ_i − sg(θ_i), sg(g_i)⟩, sg = stop-gradient)."""
    value, grads = imaml_grad(fn, params, xs, ys, xq, yq, inner_lr=inner_lr, inner_steps=inner_steps,
                              lam=lam, loss=loss)
    out = value
    for n, p in params.items():
        out = out + ((p - p.detach()) * grads[n]).sum()
    return out
