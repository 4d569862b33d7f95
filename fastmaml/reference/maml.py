"""Reference MAML: the meta-loss of docs/DESIGN.md §1 computed the plain way.

A Python loop over tasks; per task K unrolled inner steps, each
``torch.autograd.grad(create_graph=True)`` of the support loss (first order: the
inner gradients are detached), then the query loss. ``backward()`` through the
returned meta-loss differentiates the whole unrolled graph with autograd. Slow and
memory-hungry by design: it is the ground truth every fast path is tested against.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fastmaml.maml.problem import MetaProblem, PureFn, check_problem


def _inner_step(fn: PureFn, prob: MetaProblem, p: dict[str, torch.Tensor], k: int, x: torch.Tensor,
                y: torch.Tensor, create_graph: bool) -> dict[str, torch.Tensor]:
    """θ_{k+1} = θ_k − α_k ⊙ ∇_θ Ls(θ_k) on the adapted tensors of one task."""
    ls = prob.loss_fn(fn(p, x), y)
    adapted = [p[nm] for nm in prob.adapted]
    grads = torch.autograd.grad(ls, adapted, create_graph=create_graph, allow_unused=True)
    out = dict(p)
    for i, (nm, g) in enumerate(zip(prob.adapted, grads)):
        if g is None:  # the loss does not depend on this tensor
            g = torch.zeros_like(p[nm])
        if prob.first_order:
            g = g.detach()  # first order: the inner gradient is a constant of θ
        out[nm] = p[nm] - prob.lr.rate(k, i) * g
    return out


def _leaves(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """θ as given, or a fresh leaf requiring grad where θ does not require grad (so the
    inner gradients exist even when the caller differentiates nothing)."""
    return {nm: (p if p.requires_grad else p.detach().requires_grad_(True)) for nm, p in params.items()}


def maml_loss(
    fn: PureFn,
    params: Mapping[str, torch.Tensor],
    lrs: object,
    xs: torch.Tensor,
    ys: torch.Tensor,
    xq: torch.Tensor,
    yq: torch.Tensor,
    *,
    steps: int,
    first_order: bool = False,
    loss: object = "mse",
    msl_weights: object = None,
    adapt: Sequence[str] | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """M = (1/T) Σ_t Σ_k w_k · Lq(θ_{t,k}; Xq_t, Yq_t), by unrolled autograd.

    fn(params, x): a pure function of a dict name -> tensor and one task's inputs
        ``x`` [N, ...], returning predictions [N, ...].
    params: dict name -> tensor (θ, shared by the tasks; float32/float64).
    lrs: inner learning rate — a float (fixed), a 0-d tensor (scalar), [n_adapted],
        [K, n_adapted] (MAML++ LSLR), or a list/dict of per-element tensors
        [*shape_i] or [K, *shape_i] (Meta-SGD), in the order of the adapted tensors.
    xs [T, Ns, ...], ys [T, Ns, ...], xq [T, Nq, ...], yq [T, Nq, ...].
    steps: K ≥ 1; first_order: detach the inner gradients; loss: 'mse',
    'cross_entropy' or ``loss(pred, y) -> scalar``; msl_weights: [K] weights of the
    query loss after each step (None: plain MAML, w_K = 1); adapt: names of the
    tensors adapted in the inner loop (None: all; the others stay at θ and still get
    meta-gradients through the support and query losses). ``backend`` is accepted for
    signature parity and ignored. Returns a 0-d tensor, differentiable (twice, even)
    by autograd in params and lrs.
    """
    prob = check_problem(fn, params, lrs, xs, ys, xq, yq, steps=steps, first_order=first_order, loss=loss,
                         msl_weights=msl_weights, adapt=adapt)
    theta = _leaves(params)
    total = None
    with torch.enable_grad():
        for t in range(prob.T):
            p = theta
            for k in range(prob.steps):
                p = _inner_step(fn, prob, p, k, xs[t], ys[t], create_graph=True)
                w = prob.msl[k]  # weight of the query loss after step k+1
                if w != 0.0:
                    term = w * prob.loss_fn(fn(p, xq[t]), yq[t])
                    total = term if total is None else total + term
    assert total is not None or all(w == 0.0 for w in prob.msl)
    if total is None:  # every weight is 0: M = 0, still attached to θ
        total = sum((0.0 * v.sum() for v in theta.values()), torch.zeros((), dtype=xs.dtype, device=xs.device))
    return total / prob.T


def adapt(
    fn: PureFn,
    params: Mapping[str, torch.Tensor],
    lrs: object,
    xs: torch.Tensor,
    ys: torch.Tensor,
    *,
    steps: int,
    loss: object = "mse",
    adapt: Sequence[str] | None = None,
    backend: str = "auto",
) -> dict[str, torch.Tensor]:
    """The per-task adapted parameters θ_{t,steps} (detached), dict name -> [T, *shape].

    Tensors not adapted (``adapt``) are returned expanded to [T, *shape] (views of θ).
    Per-step learning rates define only K steps, so with them ``steps`` must be the K
    their first dimension gives.
    """
    prob = check_problem(fn, params, lrs, xs, ys, xs, ys, steps=steps, first_order=True, loss=loss,
                         msl_weights=None, adapt=adapt)
    theta = _leaves({nm: v.detach() for nm, v in params.items()})
    out: dict[str, list[torch.Tensor]] = {nm: [] for nm in prob.names}
    with torch.enable_grad():
        for t in range(prob.T):
            p = theta
            for k in range(prob.steps):
                p = _inner_step(fn, prob, p, k, xs[t], ys[t], create_graph=False)
            for nm in prob.names:
                out[nm].append(p[nm].detach())
    return {nm: torch.stack(v) for nm, v in out.items()}
