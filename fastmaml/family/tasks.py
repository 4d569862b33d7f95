"""Per-task losses, gradients and Hessian-vector products over a meta-batch, for the
algorithms of :mod:`fastmaml.family` (iMAML, Reptile).

A *task model* evaluates a network with per-task parameters φ (a list of tensors
``[T, *shape_i]``, in the order of ``names``) on per-task data ``x [T, N, ...]``:

* :class:`MlpTasks` — an ``nn.Sequential`` MLP on fastmaml's fused MLP ops
  (``ops.mlp_loss_and_grad``; the HVP is ``ops.mlp_hvp``, one kernel call for all T
  tasks: forward, backward and Pearlmutter's R-passes fused).
* :class:`GenericTasks` — any module that is a function of its parameters. Gradients
  by plain autograd over a vmapped forward (``task_map="vmap"``) or per task in a Python
  loop (``"loop"``, the CPU default for images, with BatchNorm by fastmaml's fused
  kernels; ``workers`` tasks at a time on the MAML layer's task threads, see
  :func:`fastmaml.maml.tasks.run_tasks`). HVPs (``hvp``):
  ``"autograd"``: the support gradient is built once with ``create_graph=True`` at the
  point where CG needs the Hessian, and every product H u is one more backward through
  that kept graph (``retain_graph``): CG's many products at one point cost one forward
  and one backward each, no recomputation of the forward; ``"fwd_rev"``: torch.func
  forward-over-reverse ``jvp(grad(L))``, vmapped over tasks (or looped), recomputed per
  product (no graph kept). Both are BatchNorm-safe: nothing differentiates through a
  vmapped torch.func gradient (pytorch/functorch#534, docs/DESIGN.md §2).

Nothing here keeps more than one set of per-task parameters, one gradient graph and
the vectors its caller holds: the memory of iMAML's meta-gradient does not depend on
the number of inner steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from fastmaml import ops
from fastmaml.maml import sequential_fn
from fastmaml.maml.mlp_path import mlp_structure
from fastmaml.maml.tasks import run_tasks
from fastmaml.ops._batch_norm import available as fused_bn_available
from fastmaml.reference.mlp import mlp_forward, task_losses

Vec = list[torch.Tensor]
HVP_FLAVOURS = ("autograd", "fwd_rev")
TASK_MAPS = ("vmap", "loop")


class MlpTasks:
    """Per-task MLP on the fused ops. ``order``: for each parameter name (the module's
    order), its index in the interleaved (W_1, b_1, W_2, b_2, ...) list of the ops."""

    path = "fused_mlp_hvp"

    def __init__(self, dims: Sequence[int], activation: str, loss: str, backend: str | None) -> None:
        self.dims, self.activation, self.loss, self.backend = list(dims), activation, loss, backend
        self.grad_reason = (f"MLP {'-'.join(map(str, dims))} ({activation}, {loss}): gradients by "
                            "ops.mlp_loss_and_grad for all tasks per call")
        self.path_reason = self.grad_reason + ", HVPs by the fused ops.mlp_hvp kernel"

    def _wb(self, phi: Sequence[torch.Tensor]) -> tuple[Vec, Vec]:
        return [p.contiguous() for p in phi[0::2]], [p.contiguous() for p in phi[1::2]]

    def _kw(self) -> dict:
        return dict(activation=self.activation, loss=self.loss, backend=self.backend)

    def grads(self, phi: Sequence[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Vec]:
        ws, bs = self._wb(phi)
        lt, gw, gb = ops.mlp_loss_and_grad(ws, bs, x.contiguous(), y.contiguous(), **self._kw())
        return lt, [g for pair in zip(gw, gb) for g in pair]

    def losses(self, phi: Sequence[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return task_losses(self.predict(phi, x), y, self.loss)

    def predict(self, phi: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        ws, bs = self._wb(phi)
        return mlp_forward(ws, bs, x, activation=self.activation)

    def hvp_at(self, phi: Sequence[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> Callable[[Vec], Vec]:
        """u -> H u at φ (H the per-task Hessian of the loss on (x, y)), fused kernel."""
        ws, bs = self._wb(phi)
        xc, yc = x.contiguous(), y.contiguous()

        def hvp(u: Vec) -> Vec:
            uw, ub = self._wb(u)
            hw, hb = ops.mlp_hvp(ws, bs, xc, yc, uw, ub, **self._kw())
            return [h for pair in zip(hw, hb) for h in pair]

        return hvp


def mlp_tasks(model: nn.Module, names: Sequence[str], loss: object, x: torch.Tensor, y: torch.Tensor,
              backend: str | None) -> tuple[MlpTasks | None, str]:
    """An :class:`MlpTasks` when the fused MLP ops cover this model and data, else
    (None, why not)."""
    st, why = mlp_structure(model)
    if st is None:
        return None, why
    dims, act = st.dims, st.activation
    want = [n for pair in zip(st.weight_names, st.bias_names) for n in pair]
    if list(names) != want:
        return None, "some MLP parameters are frozen (requires_grad=False); the fused ops adapt every tensor"
    if not isinstance(loss, str) or loss not in ("mse", "cross_entropy"):
        return None, "a custom loss callable; the fused MLP ops take 'mse' or 'cross_entropy'"
    if x.dim() != 3 or y.dim() != (3 if loss == "mse" else 2):
        return None, f"data are not [T, N, in] (xs {tuple(x.shape)}, ys {tuple(y.shape)})"
    return MlpTasks(dims, act, loss, backend), ""


class GenericTasks:
    """Per-task evaluation of ``fn(params: dict, x) -> predictions`` by autograd or
    torch.func (see the module docstring for ``task_map`` and ``hvp``)."""

    path = "generic"

    def __init__(self, fn: Callable, names: Sequence[str], loss_fn: Callable, task_map: str, hvp: str,
                 fused_bn: bool, workers: int = 1) -> None:
        if task_map not in TASK_MAPS:
            raise ValueError(f"task_map must be one of {TASK_MAPS}, got {task_map!r}")
        if hvp not in HVP_FLAVOURS:
            raise ValueError(f"hvp must be one of {HVP_FLAVOURS}, got {hvp!r}")
        self.fn, self.names, self.loss_fn = fn, list(names), loss_fn
        self.task_map, self.hvp = task_map, hvp
        self.workers = workers if task_map == "loop" else 1
        self.fused_bn = fused_bn and task_map == "loop" and fused_bn_available()
        how = "vmap over tasks" if task_map == "vmap" else "loop over tasks"
        kind = ("autograd HVPs through one kept support-gradient graph" if hvp == "autograd"
                else "torch.func forward-over-reverse jvp(grad) HVPs")
        bn = ", fused BatchNorm" if self.fused_bn else ""
        self.grad_reason = f"generic path: {how}, autograd gradients{bn}"
        self.path_reason = f"generic path: {how}, {kind}{bn}"

    # --- one task -------------------------------------------------------------------
    def _loss(self, phi: Sequence[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fused = self.fused_bn and not torch._C._are_functorch_transforms_active()
        return self.loss_fn(sequential_fn.call(self.fn, dict(zip(self.names, phi)), x, fused), y)

    def _pred(self, phi: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return self.fn(dict(zip(self.names, phi)), x)

    # --- all tasks -------------------------------------------------------------------
    def _vloss(self, a: Sequence[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.func.vmap(self._loss, in_dims=(0, 0, 0))(tuple(a), x, y)

    def _graph(self, phi: Sequence[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
               create_graph: bool) -> list[tuple[Vec, torch.Tensor, Vec]]:
        """[(leaves, loss, grads)]: one entry for the vmapped batch, or one per task."""
        with torch.enable_grad():
            if self.task_map == "vmap":
                a = [p.detach().requires_grad_(True) for p in phi]
                val = self._vloss(a, x, y)
                return [(a, val, _grads(val.sum(), a, create_graph))]
            def one(t: int) -> tuple[Vec, torch.Tensor, Vec]:
                a = [p[t].detach().requires_grad_(True) for p in phi]
                val = self._loss(a, x[t], y[t])
                return a, val, _grads(val, a, create_graph)

            return run_tasks(one, x.shape[0], self.workers)

    def grads(self, phi: Sequence[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Vec]:
        gr = self._graph(phi, x, y, False)
        if self.task_map == "vmap":
            return gr[0][1].detach(), [g.detach() for g in gr[0][2]]
        vals = torch.stack([v.detach() for _, v, _ in gr])
        return vals, [torch.stack([g[2][i] for g in gr]) for i in range(len(phi))]

    def losses(self, phi: Sequence[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.task_map == "vmap":
            return self._vloss(phi, x, y)
        return torch.stack(run_tasks(lambda t: self._loss([p[t] for p in phi], x[t], y[t]), x.shape[0], self.workers))

    def predict(self, phi: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        if self.task_map == "vmap":
            return torch.func.vmap(self._pred, in_dims=(0, 0))(tuple(phi), x)
        return torch.stack(run_tasks(lambda t: self._pred([p[t] for p in phi], x[t]), x.shape[0], self.workers))

    def hvp_at(self, phi: Sequence[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> Callable[[Vec], Vec]:
        """u -> H u at φ for every task (H: per-task Hessian of the loss on (x, y))."""
        if self.hvp == "fwd_rev":
            return self._fwd_rev_at(phi, x, y)
        graphs = self._graph(phi, x, y, True)

        def hvp(u: Vec) -> Vec:
            if self.task_map == "vmap":
                a, _, g = graphs[0]
                return _hv(g, a, u)
            outs = run_tasks(lambda t: _hv(graphs[t][2], graphs[t][0], [ui[t] for ui in u]), len(graphs),
                             self.workers)
            return [torch.stack([o[i] for o in outs]) for i in range(len(u))]

        return hvp

    def _fwd_rev_at(self, phi: Sequence[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> Callable[[Vec], Vec]:
        def one(p: tuple, xt: torch.Tensor, yt: torch.Tensor, ut: tuple) -> tuple:
            grad = torch.func.grad(lambda q: self._loss(q, xt, yt))
            return torch.func.jvp(grad, (p,), (ut,))[1]

        fixed = tuple(p.detach() for p in phi)

        def hvp(u: Vec) -> Vec:
            if self.task_map == "vmap":
                return list(torch.func.vmap(one)(fixed, x, y, tuple(u)))
            outs = [one(tuple(p[t] for p in fixed), x[t], y[t], tuple(ui[t] for ui in u)) for t in range(x.shape[0])]
            return [torch.stack([o[i] for o in outs]) for i in range(len(u))]

        return hvp


def _grads(val: torch.Tensor, wrt: Sequence[torch.Tensor], create_graph: bool) -> Vec:
    gs = torch.autograd.grad(val, list(wrt), create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(w) if g is None else g for g, w in zip(gs, wrt)]


def _hv(g: Sequence[torch.Tensor], a: Sequence[torch.Tensor], u: Sequence[torch.Tensor]) -> Vec:
    """H u = ∂(g · u)/∂a through the kept graph of g (kept for the next product)."""
    live = [(gi, ui) for gi, ui in zip(g, u) if gi.requires_grad]
    if not live:  # the gradient does not depend on the parameters (a linear loss)
        return [torch.zeros_like(w) for w in a]
    with torch.enable_grad():
        hs = torch.autograd.grad([gi for gi, _ in live], list(a), grad_outputs=[ui for _, ui in live],
                                 retain_graph=True, allow_unused=True)
    return [torch.zeros_like(w) if h is None else h for h, w in zip(hs, a)]


def inner_loop(tasks: MlpTasks | GenericTasks, theta: Sequence[torch.Tensor], xs: torch.Tensor,
               ys: torch.Tensor, *, lr: float, steps: int, lam: float,
               sgd_backend: str | None) -> Vec:
    """φ_K of every task: φ_0 = θ, φ_{k+1} = φ_k − lr (∇Ls(φ_k) + λ (φ_k − θ)), the update
    by the fused ``ops.sgd_step`` (λ = 0: plain SGD, Reptile's inner loop). No graph;
    one set of per-task parameters alive at a time."""
    T = xs.shape[0]
    th = [p.detach() for p in theta]
    phi = [p.unsqueeze(0).expand(T, *p.shape).contiguous() for p in th]
    with torch.no_grad():
        for _ in range(steps):
            _, g = tasks.grads(phi, xs, ys)
            if lam != 0.0:
                g = [gi.add(pi - ti, alpha=lam) for gi, pi, ti in zip(g, phi, th)]
            phi = ops.sgd_step(phi, [gi.contiguous() for gi in g], lr, backend=sgd_backend)
    return phi
