"""How the per-task derivatives of the support and query losses are taken (``hvp``).

The meta-step needs three primitives over a meta-batch, each per task t:

* ``support_grads``: g_t = ∇_θa Ls(θ_t);
* ``query``: (∇Lq(θ_t), Lq(θ_t)) (∇ over the fixed tensors φ too when asked);
* ``grad_hvp``: (g_t, H_t u_t) with the tangent u on the adapted tensors θa only.

:class:`Derivatives` maps them over the tasks by ``vmap`` or a Python loop (see
:mod:`fastmaml.maml.tasks`); each flavour supplies the one per-task product
:meth:`Derivatives.task_grad_hvp`:

* ``"autograd"`` (:class:`Autograd`, the default): plain autograd. Per task
  reverse-over-reverse (``create_graph`` then a second ``autograd.grad`` with
  grad_outputs u); under vmap, autograd through a vmapped *forward*: tasks are
  independent, so the gradient of Σ_t L_t w.r.t. per-task parameters [T, *shape] is
  the per-task gradient, and w.r.t. the shared φ the sum over tasks. The derivative
  passes run in autograd's C++ engine with no functorch levels (fastest measured).
* ``"rev_rev"`` (:class:`RevRev`): ``vjp(grad(L))`` by torch.func, both levels inside
  the task (inside vmap).
* ``"fwd_rev"`` (:class:`FwdRev`): ``jvp(grad(L))``, forward-over-reverse (Pearlmutter).
  Exact and BatchNorm-safe too, but slower in eager PyTorch on CPU (forward-mode AD of
  the backward ops goes through Python decompositions).

BatchNorm (pytorch/functorch#534): differentiating *through* a ``vmap(grad(...))``
gives wrong second derivatives through ``batch_norm``. No flavour does that: every
derivative level is taken either per task inside vmap, or by ordinary autograd over
the physical ops of a vmapped forward (no torch.func gradient level exists to be
differentiated through).

With ANIL the gradient is taken w.r.t. (θa, φ) and the tangent lives on θa, so the
same product yields the mixed term H_{φθ} u the fixed tensors need (docs/DESIGN.md §1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fastmaml.maml import sequential_fn
from fastmaml.maml.problem import MetaProblem, PureFn
from fastmaml.maml.tasks import map_tasks

HVPS = ("auto", "autograd", "rev_rev", "fwd_rev")


@dataclass(frozen=True)
class TaskLoss:
    """L(θa, φ, x, y) of one task: the loss of ``fn`` on the named parameters; with
    ``fused_bn`` the model's batch-statistics ``F.batch_norm`` calls run by the fused
    BatchNorm (outside torch.func transforms; the mode is entered per call: modes are
    per thread)."""

    fn: PureFn
    prob: MetaProblem
    fused_bn: bool = False

    def params(self, pa: Sequence[torch.Tensor], pf: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        d = dict(zip(self.prob.adapted, pa))
        d.update(zip(self.prob.fixed, pf))
        return d

    def __call__(self, pa: tuple, pf: tuple, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fused = self.fused_bn and not torch._C._are_functorch_transforms_active()
        return self.prob.loss_fn(sequential_fn.call(self.fn, self.params(pa, pf), x, fused), y)


# --- plain autograd pieces (per task, or through a vmapped forward) ----------------------
def leaves(ts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().requires_grad_(True) for t in ts]


def grads(out: Any, wrt: Sequence[torch.Tensor], **kw: Any) -> list[torch.Tensor]:
    gs = torch.autograd.grad(out, wrt, allow_unused=True, **kw)
    return [torch.zeros_like(w) if g is None else g for g, w in zip(gs, wrt)]


def hvp_of(g: Sequence[torch.Tensor], u: Sequence[torch.Tensor], wrt: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """∂(g · u)/∂wrt from a gradient ``g`` taken with create_graph (zeros when ``g``
    does not depend on the parameters: a linear loss)."""
    live = [(gi, ui) for gi, ui in zip(g, u) if gi.requires_grad]
    if live:
        return grads([gi for gi, _ in live], wrt, grad_outputs=[ui for _, ui in live])
    return [torch.zeros_like(w) for w in wrt]


def batched_leaves(pa: tuple, T: int, shared: bool) -> list[torch.Tensor]:
    return [(p.detach().unsqueeze(0).expand(T, *p.shape) if shared else p.detach()).requires_grad_(True)
            for p in pa]


def batched_loss(loss: TaskLoss, a: Sequence[torch.Tensor], f: Sequence[torch.Tensor], x: torch.Tensor,
                 y: torch.Tensor) -> torch.Tensor:
    """[L_t] by a vmapped forward (only the forward is batched; autograd differentiates
    its physical ops)."""
    return torch.func.vmap(loss, in_dims=(0, None, 0, 0))(tuple(a), tuple(f), x, y)


def loop_task_grad(loss: TaskLoss, pa: tuple, pf: tuple, x: torch.Tensor, y: torch.Tensor,
                   with_fixed: bool) -> tuple:
    """(g, L) of one task by plain autograd; g = (g_a, g_f) with ``with_fixed``."""
    with torch.enable_grad():
        a = leaves(pa)
        f = leaves(pf) if with_fixed else list(pf)
        val = loss(tuple(a), tuple(f), x, y)
        g = grads(val, a + (f if with_fixed else []))
    ga = tuple(g[:len(a)])
    return ((ga, tuple(g[len(a):])) if with_fixed else ga), val.detach()


class Derivatives:
    """The three primitives over a meta-batch, mapped by ``task_map`` ('vmap' | 'loop');
    ``pa`` (adapted tensors) is shared ([*shape], step 0: ``shared``) or per task.
    A flavour implements :meth:`task_grad_hvp`; the loop's gradients are plain autograd
    per task whatever the flavour."""

    def __init__(self, loss: TaskLoss, workers: int = 1) -> None:
        self.loss = loss
        self.workers = workers

    def task_grad_hvp(self, with_fixed: bool) -> Callable[..., tuple]:
        """f(pa, pf, x, y, u) -> (g, H u) of one task; with ``with_fixed``
        ((g_a, g_f or ()), (H_aa u, H_fa u))."""
        raise NotImplementedError

    # --- vmapped forms (torch.func by default) -------------------------------------------
    def vmapped_grad(self, pa: tuple, pf: tuple, x: torch.Tensor, y: torch.Tensor, shared: bool) -> tuple:
        d = None if shared else 0
        return torch.func.vmap(torch.func.grad(self.loss), in_dims=(d, None, 0, 0))(pa, pf, x, y)

    def vmapped_grad_and_value(self, pa: tuple, pf: tuple, x: torch.Tensor, y: torch.Tensor,
                               with_fixed: bool) -> tuple:
        f = torch.func.grad_and_value(self.loss, argnums=(0, 1) if with_fixed else 0)
        return torch.func.vmap(f, in_dims=(0, None, 0, 0))(pa, pf, x, y)

    def vmapped_grad_hvp(self, pa: tuple, pf: tuple, x: torch.Tensor, y: torch.Tensor, u: tuple, shared: bool,
                         with_fixed: bool) -> tuple:
        d = None if shared else 0
        g, hv = torch.func.vmap(self.task_grad_hvp(with_fixed), in_dims=(d, None, 0, 0, 0))(pa, pf, x, y, u)
        return (g[0], hv[0], hv[1]) if with_fixed else (g, hv, None)

    # --- the primitives ------------------------------------------------------------------
    def support_grads(self, pa: tuple, pf: tuple, xs: torch.Tensor, ys: torch.Tensor, shared: bool,
                      task_map: str) -> tuple:
        if task_map == "vmap":
            return self.vmapped_grad(pa, pf, xs, ys, shared)
        f = lambda a, pf_, x, y: loop_task_grad(self.loss, a, pf_, x, y, False)[0]  # noqa: E731
        return map_tasks(f, (None if shared else 0, None, 0, 0), "loop", self.workers)(pa, pf, xs, ys)

    def query(self, pa: tuple, pf: tuple, xq: torch.Tensor, yq: torch.Tensor, need_grad: bool, with_fixed: bool,
              task_map: str) -> Any:
        """need_grad: (grads, values [T]); else values [T]."""
        if not need_grad:
            return map_tasks(self.loss, (0, None, 0, 0), task_map, self.workers)(pa, pf, xq, yq)
        if task_map == "vmap":
            return self.vmapped_grad_and_value(pa, pf, xq, yq, with_fixed)
        f = lambda a, pf_, x, y: loop_task_grad(self.loss, a, pf_, x, y, with_fixed)  # noqa: E731
        return map_tasks(f, (0, None, 0, 0), "loop", self.workers)(pa, pf, xq, yq)

    def grad_hvp(self, pa: tuple, pf: tuple, xs: torch.Tensor, ys: torch.Tensor, u: tuple, shared: bool,
                 with_fixed: bool, task_map: str) -> tuple:
        """(g_a, H_aa u, H_fa u or None), per task."""
        if task_map == "vmap":
            return self.vmapped_grad_hvp(pa, pf, xs, ys, u, shared, with_fixed)
        per_task = map_tasks(self.task_grad_hvp(with_fixed), (None if shared else 0, None, 0, 0, 0), "loop",
                             self.workers)
        g, hv = per_task(pa, pf, xs, ys, u)
        return (g[0], hv[0], hv[1]) if with_fixed else (g, hv, None)


class Autograd(Derivatives):
    """Plain autograd: reverse-over-reverse per task, and through a vmapped forward
    under vmap (no torch.func gradient level at all)."""

    def task_grad_hvp(self, with_fixed: bool) -> Callable[..., tuple]:
        def one(pa: tuple, pf: tuple, x: torch.Tensor, y: torch.Tensor, u: tuple) -> tuple:
            with torch.enable_grad():
                a = leaves(pa)
                f = leaves(pf) if with_fixed else list(pf)
                g = grads(self.loss(tuple(a), tuple(f), x, y), a, create_graph=True)
                hv = hvp_of(g, u, a + (f if with_fixed else []))
            g = tuple(gi.detach() for gi in g)
            return ((g, ()), (tuple(hv[:len(a)]), tuple(hv[len(a):]))) if with_fixed else (g, tuple(hv))

        return one

    def vmapped_grad(self, pa: tuple, pf: tuple, x: torch.Tensor, y: torch.Tensor, shared: bool) -> tuple:
        return self._batched_grad(pa, pf, x, y, shared, False)[0]

    def vmapped_grad_and_value(self, pa: tuple, pf: tuple, x: torch.Tensor, y: torch.Tensor,
                               with_fixed: bool) -> tuple:
        return self._batched_grad(pa, pf, x, y, False, with_fixed)

    def _batched_grad(self, pa: tuple, pf: tuple, x: torch.Tensor, y: torch.Tensor, shared: bool,
                      with_fixed: bool) -> tuple:
        with torch.enable_grad():
            a = batched_leaves(pa, x.shape[0], shared)
            f = leaves(pf) if with_fixed else list(pf)
            vals = batched_loss(self.loss, a, f, x, y)
            g = grads(vals.sum(), a + (f if with_fixed else []))
        ga = tuple(g[:len(a)])
        if with_fixed:
            return (ga, tuple(gi.unsqueeze(0) for gi in g[len(a):])), vals.detach()
        return ga, vals.detach()

    def vmapped_grad_hvp(self, pa: tuple, pf: tuple, x: torch.Tensor, y: torch.Tensor, u: tuple, shared: bool,
                         with_fixed: bool) -> tuple:
        with torch.enable_grad():
            a = batched_leaves(pa, x.shape[0], shared)
            f = leaves(pf) if with_fixed else list(pf)
            g = grads(batched_loss(self.loss, a, f, x, y).sum(), a, create_graph=True)
            hv = hvp_of(g, u, a + (f if with_fixed else []))
        g = tuple(gi.detach() for gi in g)
        if with_fixed:
            return g, tuple(hv[:len(a)]), tuple(h.unsqueeze(0) for h in hv[len(a):])
        return g, tuple(hv), None


class RevRev(Derivatives):
    """``vjp(grad(L))`` per task by torch.func. With ``with_fixed``, by the symmetry of
    the Hessian, ∂/∂(θa, φ) (∇_θa L · u) = H_{(θa,φ),θa} u."""

    def task_grad_hvp(self, with_fixed: bool) -> Callable[..., tuple]:
        loss = self.loss

        def one(pa: tuple, pf: tuple, x: torch.Tensor, y: torch.Tensor, u: tuple) -> tuple:
            if with_fixed:
                def ga_of(a: tuple, f: tuple) -> Any:
                    g = torch.func.grad(loss, argnums=(0, 1))(a, f, x, y)
                    return g[0], g
                _, vjp_fn, g = torch.func.vjp(ga_of, pa, pf, has_aux=True)
                return g, vjp_fn(u)
            g, vjp_fn = torch.func.vjp(lambda a: torch.func.grad(loss)(a, pf, x, y), pa)
            return g, vjp_fn(u)[0]

        return one


class FwdRev(Derivatives):
    """``jvp(grad(L))`` per task by torch.func (forward-over-reverse)."""

    def task_grad_hvp(self, with_fixed: bool) -> Callable[..., tuple]:
        loss, argnums = self.loss, ((0, 1) if with_fixed else 0)

        def one(pa: tuple, pf: tuple, x: torch.Tensor, y: torch.Tensor, u: tuple) -> tuple:
            return torch.func.jvp(lambda a: torch.func.grad(loss, argnums=argnums)(a, pf, x, y), (pa,), (u,))

        return one


FLAVOURS: dict[str, type[Derivatives]] = {"autograd": Autograd, "rev_rev": RevRev, "fwd_rev": FwdRev}


def choose_hvp(hvp: str) -> str:
    if hvp not in HVPS:
        raise ValueError(f"hvp must be one of {HVPS}, got {hvp!r}")
    return "autograd" if hvp == "auto" else hvp
