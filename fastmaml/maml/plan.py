"""The plan of one generic meta-step: the checked problem and every choice the
dispatch made for it (task map, derivative flavour, HVP map, workers, graph budget,
fused BatchNorm), built once by keyword and never changed; what follows from the
choices (one task at a time, the derivative object) is derived from them.

Kept support graphs (:func:`kept_support_grads`): the adjoint recomputes each inner
step's support forward/backward for its Hessian-vector product. Where the support
graphs are small, the graphs of the steps are kept instead (the last step's always,
one step's activations; the earlier ones while K-1 graphs of step 0's measured size
fit ``graph_memory_mb``), and the backward's HVP at such a step reuses the graph.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from fastmaml.maml.hvp import FLAVOURS, Derivatives, TaskLoss, batched_leaves, batched_loss, grads, hvp_of, leaves
from fastmaml.maml.problem import MetaProblem, PureFn
from fastmaml.maml.tasks import run_tasks


@dataclass(frozen=True, kw_only=True)
class Plan:
    """Static (non-tensor) description of one meta-step, passed to the meta-step's
    ``autograd.Function``; its primitives map the per-task derivatives over the tasks.

    ``task_map``: 'vmap' | 'loop'; ``hvp``: 'autograd' | 'rev_rev' | 'fwd_rev';
    ``hvp_map``: the task map of the backward's HVPs ('' = ``task_map``);
    ``sgd_backend``: ``ops.sgd_step``'s backend (None: automatic); ``grad_enabled``: the
    caller's grad mode when the meta-loss was built; ``workers``: tasks the per-task
    loop runs at once; ``op_threads``: intra-op threads for the meta-step's forward and
    backward (0: torch's setting; :func:`fastmaml.maml.tasks.op_threads`); ``graph_budget``: bytes of support graphs kept beyond the last
    step's; ``fused_bn``: route the model's batch-statistics ``F.batch_norm``;
    ``step_hook(k, support)``: called before every evaluation at inner step k (the
    support forward at θ_k with support=True, the query after step k and the backward's
    recomputation at θ_k with support=False), for per-step layers
    (:class:`fastmaml.nn.PerStepBatchNorm2d`)."""

    fn: PureFn
    prob: MetaProblem
    task_map: str
    hvp: str = "autograd"
    hvp_map: str = ""
    sgd_backend: str | None = None
    grad_enabled: bool = True
    workers: int = 1
    op_threads: int = 0
    graph_budget: int = 0
    fused_bn: bool = False
    step_hook: Callable[[int, bool], None] | None = None

    @property
    def n_lr(self) -> int:
        return len(self.prob.lr.tensors)

    @property
    def per_task(self) -> bool:
        """One task at a time (forward and adjoint per task, see the meta-step): where the
        tasks already run one after another, HVPs included."""
        return self.task_map == "loop" and self.workers == 1 and (self.hvp_map or self.task_map) == "loop"

    @cached_property
    def derivatives(self) -> Derivatives:
        return FLAVOURS[self.hvp](TaskLoss(self.fn, self.prob, self.fused_bn), self.workers)

    def support_grads(self, pa: tuple, pf: tuple, xs: torch.Tensor, ys: torch.Tensor, shared: bool) -> tuple:
        return self.derivatives.support_grads(pa, pf, xs, ys, shared, self.task_map)

    def query(self, pa: tuple, pf: tuple, xq: torch.Tensor, yq: torch.Tensor, need_grad: bool,
              with_fixed: bool) -> Any:
        return self.derivatives.query(pa, pf, xq, yq, need_grad, with_fixed, self.task_map)

    def grad_hvp(self, pa: tuple, pf: tuple, xs: torch.Tensor, ys: torch.Tensor, u: tuple, shared: bool,
                 with_fixed: bool) -> tuple:
        """(g_a, H_aa u, H_fa u or None), per task, mapped by ``hvp_map``."""
        return self.derivatives.grad_hvp(pa, pf, xs, ys, u, shared, with_fixed, self.hvp_map or self.task_map)

    def support_grads_kept(self, pa: tuple, pf: tuple, xs: torch.Tensor, ys: torch.Tensor, shared: bool,
                           with_fixed: bool, measure: bool = False
                           ) -> tuple[tuple, Callable[[tuple], tuple], int | None]:
        """The support gradient at one inner step with its graph kept (see
        :func:`kept_support_grads`)."""
        return kept_support_grads(self.derivatives.loss, pa, pf, xs, ys, shared, with_fixed, self.task_map,
                                  self.workers, measure)


def kept_support_grads(loss: TaskLoss, pa: tuple, pf: tuple, xs: torch.Tensor, ys: torch.Tensor, shared: bool,
                       with_fixed: bool, task_map: str, workers: int, measure: bool = False
                       ) -> tuple[tuple, Callable[[tuple], tuple], int | None]:
    """(g, hvp, bytes) at one inner step: the support gradient is taken with
    create_graph=True and its graph kept, so the backward's HVP at this step,
    hvp(u) -> (H_aa u, H_fa u or None), needs no recomputation of the support
    forward/backward. With ``measure`` (per-task loop only) ``bytes`` is the size of the
    tensors the graph saves beyond its inputs, counted by saved-tensor hooks; else None.
    Only for the 'autograd' derivative flavour (vmap) and the loop."""
    T = xs.shape[0]
    sizes = [0] * T
    with torch.enable_grad():
        if task_map == "vmap":
            a = batched_leaves(pa, T, shared)
            f = leaves(pf) if with_fixed else list(pf)
            graphs = [(a, f, grads(batched_loss(loss, a, f, xs, ys).sum(), a, create_graph=True))]
        else:
            def build(t: int) -> tuple:
                a = leaves(pa if shared else tuple(p[t] for p in pa))
                f = leaves(pf) if with_fixed else list(pf)
                return a, f, grads(loss(tuple(a), tuple(f), xs[t], ys[t]), a, create_graph=True)

            def one(t: int) -> tuple:  # run_tasks carries the enabled grad mode into workers
                if not measure:
                    return build(t)
                seen = {x.untyped_storage().data_ptr() for x in (*pa, *pf, xs, ys)}

                def pack(x: torch.Tensor) -> torch.Tensor:
                    st = x.untyped_storage()
                    if st.data_ptr() not in seen:
                        seen.add(st.data_ptr())
                        sizes[t] += st.nbytes()
                    return x

                with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
                    return build(t)

            graphs = run_tasks(one, T, workers)
    if task_map == "vmap":
        g = tuple(gi.detach() for gi in graphs[0][2])
    else:
        g = tuple(torch.stack([gr[2][i].detach() for gr in graphs]) for i in range(len(pa)))

    def hvp(u: tuple) -> tuple:
        def one(t: int) -> list[torch.Tensor]:
            a, f, gk = graphs[t]
            graphs[t] = None  # the graph is used once; free it as soon as it is
            ut = u if task_map == "vmap" else tuple(ui[t] for ui in u)
            return hvp_of(gk, ut, a + (f if with_fixed else []))

        outs = run_tasks(one, len(graphs), 1 if task_map == "vmap" else workers)
        graphs.clear()
        na = len(pa)
        if task_map == "vmap":
            hv = outs[0]
            hv_f = tuple(h.unsqueeze(0) for h in hv[na:]) if with_fixed else None
            return tuple(hv[:na]), hv_f
        hv_a = tuple(torch.stack([o[i] for o in outs]) for i in range(na))
        hv_f = tuple(torch.stack([o[na + i] for o in outs]) for i in range(len(pf))) if with_fixed else None
        return hv_a, hv_f

    return g, hvp, (sum(sizes) if measure and task_map != "vmap" else None)
