"""Conjugate gradient for T independent symmetric positive-definite systems at once.

iMAML's meta-gradient needs, per task t, the solution of A_t x_t = b_t with
A_t = I + H_t/λ (H_t the support Hessian at the adapted parameters) and
b_t = ∇Lq(φ_t). CG needs only products A_t p_t, which are HVPs; here every task's CG
runs in lockstep: one batched matrix-vector product per iteration for all T tasks
(one fused HVP call on the MLP path), with per-task scalars α_t, β_t kept as [T]
tensors. A task whose relative residual ‖r_t‖/‖b_t‖ has reached ``tol`` is masked
(α_t = β_t = 0 from then on, its x_t frozen), not removed: the batched product keeps
its shape, and no Python loop over tasks exists.

Vectors are lists of tensors ``[T, *shape_i]`` (one per parameter tensor); the inner
products ⟨a_t, b_t⟩ are sums over all of them, per task.

The recursion (Hestenes–Stiefel), per task:

    x_0 = 0, r_0 = b, p_0 = r_0
    α_i = ⟨r_i, r_i⟩ / ⟨p_i, A p_i⟩
    x_{i+1} = x_i + α_i p_i,  r_{i+1} = r_i − α_i A p_i
    β_i = ⟨r_{i+1}, r_{i+1}⟩ / ⟨r_i, r_i⟩,  p_{i+1} = r_{i+1} + β_i p_i

In exact arithmetic x_i minimises the A-norm error ‖x_i − x*‖_A over the Krylov space
of dimension i, so that error decreases monotonically and x_n = x* after n = the
number of unknowns steps. A non-positive curvature ⟨p, A p⟩ ≤ 0 means A is not
positive definite (for iMAML: H has an eigenvalue ≤ −λ, so φ_K is not near a minimum of
the proximal objective and the implicit gradient's premise fails). CG's next iterate
would then be meaningless: by default the solve raises; with ``indefinite="truncate"``
that task's CG stops at its last iterate before the breakdown (truncated CG, as in
Steihaug's trust-region CG) and is reported in ``CGInfo.indefinite``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Vec = list[torch.Tensor]


def task_dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """⟨a_t, b_t⟩ for every task: [T], summed over the tensors of the vectors."""
    out = None
    for x, y in zip(a, b):
        d = (x * y).reshape(x.shape[0], -1).sum(1)
        out = d if out is None else out + d
    assert out is not None
    return out


def _bcast(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return s.view(-1, *([1] * (like.dim() - 1)))


@dataclass
class CGInfo:
    """What one batched solve did: iterations run (the same for all tasks, lockstep),
    per-task relative residuals ‖r_t‖/‖b_t‖ at the end, which tasks converged, and
    which were truncated at a non-positive curvature (``indefinite="truncate"``)."""

    iterations: int
    residuals: torch.Tensor
    converged: torch.Tensor
    indefinite: torch.Tensor


INDEFINITE = ("raise", "truncate")


def batched_cg(matvec: Callable[[Vec], Vec], b: Sequence[torch.Tensor], *, steps: int, tol: float,
               callback: Callable[[int, Vec], None] | None = None,
               indefinite: str = "raise") -> tuple[Vec, CGInfo]:
    """Solve A_t x_t = b_t for all tasks t by at most ``steps`` lockstep CG iterations.

    matvec(p) -> A p for a whole batch (lists of [T, *shape_i]); b: the right-hand
    sides, same layout. A task stops (is masked) when ‖r_t‖ ≤ tol·‖b_t‖ (b_t = 0: x_t = 0
    at once); the loop ends when every task has stopped or after ``steps`` iterations.
    ``callback(i, x)`` sees the iterate after iteration i (tests use it for the
    A-norm error). An unconverged task meeting ⟨p, A p⟩ ≤ 0 raises RuntimeError
    (``indefinite="raise"``) or stops at its current iterate (``"truncate"``)."""
    if indefinite not in INDEFINITE:
        raise ValueError(f"indefinite must be one of {INDEFINITE}, got {indefinite!r}")
    x = [torch.zeros_like(bi) for bi in b]
    r = [bi.clone() for bi in b]
    p = [bi.clone() for bi in b]
    bb = task_dot(b, b)
    rr = bb.clone()
    thresh = (tol * tol) * bb
    active = rr > thresh
    truncated = torch.zeros_like(active)
    it = 0
    for it in range(1, steps + 1):
        if not bool(active.any()):
            it -= 1
            break
        ap = matvec(p)
        pap = task_dot(p, ap)
        bad = active & ~(pap > 0)
        if indefinite == "truncate":
            truncated |= bad
            active = active & ~bad
        elif bool(bad.any()):
            t = int(bad.nonzero()[0, 0])
            raise RuntimeError(
                f"conjugate gradient: the system matrix of task {t} is not positive definite "
                f"(curvature <p, A p> = {float(pap[t]):.3e} <= 0 at iteration {it}); for iMAML, A = I + H/lam "
                "with H the support Hessian: increase lam")
        one = torch.ones_like(pap)
        alpha = torch.where(active, rr / torch.where(active, pap, one), torch.zeros_like(pap))
        for xi, ri, pi, api in zip(x, r, p, ap):
            a = _bcast(alpha, xi)
            xi.add_(a * pi)
            ri.sub_(a * api)
        rr_new = task_dot(r, r)
        beta = torch.where(active, rr_new / torch.where(active, rr, one), torch.zeros_like(rr))
        for pi, ri in zip(p, r):
            pi.mul_(_bcast(beta, pi)).add_(ri)
        rr = torch.where(active, rr_new, rr)
        active = active & (rr_new > thresh)
        if callback is not None:
            callback(it, x)
    res = torch.sqrt(rr / torch.where(bb > 0, bb, torch.ones_like(bb)))
    return x, CGInfo(it, res, ~active & ~truncated, truncated)
