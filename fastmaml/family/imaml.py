"""Implicit MAML (Rajeswaran et al. 2019) on fastmaml's fused HVPs.

Per task t, the inner loop approximately minimises the proximal support objective

    G_t(φ) = Ls_t(φ) + (λ/2) ‖φ − θ‖²

by K plain gradient steps from φ_0 = θ: φ_{k+1} = φ_k − α (∇Ls_t(φ_k) + λ (φ_k − θ)).
At a minimiser φ_t*(θ), ∇G_t = 0 gives dφ_t*/dθ = (I + H_t/λ)⁻¹ (implicit function
theorem; H_t the Hessian of Ls_t at φ_t*), so the meta-gradient of the meta-loss
M = (1/T) Σ_t Lq_t(φ_t) is

    dM/dθ = (1/T) Σ_t (I + H_t/λ)⁻¹ ∇Lq_t(φ_{t,K}),

with H_t taken at φ_{t,K}. It does not differentiate through the inner loop at all:
memory is one set of per-task parameters, the query gradient and the CG vectors,
independent of K. The linear systems are solved by conjugate gradient
(:func:`fastmaml.family.cg.batched_cg`), all tasks in lockstep, whose products
A u = u + H u/λ are fastmaml's HVPs (the fused ``ops.mlp_hvp`` kernel for MLPs, one
kernel call for all tasks per CG iteration; elsewhere the generic path's, see
:mod:`fastmaml.family.tasks`). With ``cg_steps`` ≥ the number of parameters and the
default ``cg_tol`` (1e-10 relative residual) the solve is exact to rounding: the tests
compare with an explicit-Hessian solve (:mod:`fastmaml.reference.imaml`).

The meta-loss is once-differentiable: its backward runs CG without a graph; a double
backward raises RuntimeError. The CG runs in the backward (only when a meta-gradient is
asked for); ``iMAML.last_cg`` / the ``info`` dict of :func:`imaml_loss` report its
iterations and residuals.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fastmaml import _checks
from fastmaml.reference import imaml as ref
from fastmaml._autograd import once_differentiable
from fastmaml.family.cg import INDEFINITE, batched_cg
from fastmaml.family.problem import check_choice, nonneg_float, positive_float, select_tasks
from fastmaml.family.tasks import GenericTasks, MlpTasks, inner_loop
from fastmaml.maml.tasks import confined, op_threads

_DOUBLE_BACKWARD = ("fastmaml: the iMAML meta-loss is once-differentiable: its backward is a conjugate-gradient "
                    "solve run without an autograd graph. Use backend='reference' for higher derivatives.")


def _once(backward: Any) -> Any:
    return once_differentiable(backward, _DOUBLE_BACKWARD)


class _Run:
    """One meta-step's fixed pieces: task model, data and settings."""

    def __init__(self, tasks: MlpTasks | GenericTasks, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor,
                 yq: torch.Tensor, lr: float, steps: int, lam: float, cg_steps: int, cg_tol: float,
                 indefinite: str, sgd_backend: str | None, info: dict | None) -> None:
        self.tasks, self.xs, self.ys, self.xq, self.yq = tasks, xs, ys, xq, yq
        self.lr, self.steps, self.lam, self.cg_steps, self.cg_tol = lr, steps, lam, cg_steps, cg_tol
        self.indefinite, self.sgd_backend, self.info = indefinite, sgd_backend, info
        self.op_threads = op_threads("auto", xs.device)  # the cores other processes leave (MAML's rule)

    def forward(self, theta: tuple) -> tuple[torch.Tensor, list, list]:
        phi = inner_loop(self.tasks, theta, self.xs, self.ys, lr=self.lr, steps=self.steps, lam=self.lam,
                         sgd_backend=self.sgd_backend)
        with torch.no_grad():
            lq, gq = self.tasks.grads(phi, self.xq, self.yq)
        return lq.mean(), phi, gq

    def meta_grad(self, phi: list, gq: list) -> list[torch.Tensor]:
        """(1/T) Σ_t (I + H_t/λ)⁻¹ ∇Lq_t, by lockstep CG on the task model's HVPs."""
        hvp = self.tasks.hvp_at(phi, self.xs, self.ys)
        inv = 1.0 / self.lam

        def matvec(p: list) -> list:
            return [pi + inv * hi for pi, hi in zip(p, hvp(p))]

        x, info = batched_cg(matvec, gq, steps=self.cg_steps, tol=self.cg_tol, indefinite=self.indefinite)
        if self.info is not None:
            self.info.update(cg_iterations=info.iterations, cg_residuals=info.residuals,
                             cg_converged=info.converged, cg_indefinite=info.indefinite)
        T = self.xs.shape[0]
        return [xi.sum(0) / T for xi in x]


class _ImplicitStep(torch.autograd.Function):
    """forward(run, *θ) -> M (0-d); backward: the implicit meta-gradient."""

    @staticmethod
    def forward(ctx: Any, run: _Run, grad_on: bool, *theta: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        with confined(run.op_threads):
            value, phi, gq = run.forward(theta)
        ctx.run = run
        ctx.st = (phi, gq) if grad_on and any(ctx.needs_input_grad[2:]) else None
        ctx.save_for_backward(*theta)  # version counters catch in-place edits of θ
        return value

    @staticmethod
    @_once
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:  # type: ignore[override]
        ctx.saved_tensors  # noqa: B018 - raises if θ was modified in place since the forward
        if ctx.st is None:
            raise RuntimeError("iMAML meta-loss built without grad mode: no meta-gradient was prepared")
        phi, gq = ctx.st
        ctx.st = None
        with confined(ctx.run.op_threads):
            grads = ctx.run.meta_grad(phi, gq)
        return (None, None, *[grad_out * g for g in grads])


def imaml_loss(
    fn: Any,
    params: Mapping[str, torch.Tensor],
    xs: torch.Tensor,
    ys: torch.Tensor,
    xq: torch.Tensor,
    yq: torch.Tensor,
    *,
    inner_lr: float,
    inner_steps: int,
    lam: float,
    cg_steps: int,
    cg_tol: float = 1e-10,
    cg_indefinite: str = "raise",
    loss: object = "mse",
    backend: str = "auto",
    task_map: str = "auto",
    hvp: str = "auto",
    info: dict | None = None,
) -> torch.Tensor:
    """The iMAML meta-loss M = (1/T) Σ_t Lq_t(φ_{t,K}); ``M.backward()`` writes the
    implicit meta-gradient (1/T) Σ_t (I + H_t/λ)⁻¹ ∇Lq_t(φ_{t,K}) into the params' ``.grad``.

    fn: an ``nn.Module`` (called by ``functional_call``; an ``nn.Sequential`` MLP of Linear
        and ReLU/Tanh with every parameter in ``params`` takes the fused MLP ops) or a
        pure ``fn(params: dict, x) -> predictions``.
    params: dict name -> θ tensor (float32/float64), shared by the tasks.
    xs [T, Ns, ...], ys [T, Ns, ...] (float for 'mse', int64 for 'cross_entropy'),
    xq [T, Nq, ...], yq [T, Nq, ...].
    inner_lr: α > 0; inner_steps: K ≥ 1 gradient steps on Ls + (λ/2)‖φ − θ‖²; lam: λ > 0.
    cg_steps: at most this many CG iterations; cg_tol: stop a task's CG at relative
        residual ‖r‖/‖b‖ ≤ cg_tol (default 1e-10: with cg_steps ≥ the parameter count
        the solve is exact to rounding).
    cg_indefinite: 'raise' (default) | 'truncate': what a task's CG does on meeting a
        non-positive curvature, i.e. when I + H/λ is not positive definite (H has an
        eigenvalue ≤ −λ; a larger λ cures it): raise RuntimeError, or stop that task at
        its last iterate (truncated CG; reported in info['cg_indefinite']).
    loss: 'mse' | 'cross_entropy' | loss(pred, y) -> scalar.
    backend: 'auto' | 'cpu' | 'cuda' | 'triton' (the ops' backend) | 'reference'
        (explicit Hessian and a dense solve per task: small nets only).
    task_map: 'auto' | 'vmap' | 'loop'; hvp: 'auto' | 'autograd' | 'fwd_rev' (the
        generic path's HVP flavour; anything but 'auto' for both skips the MLP ops).
    info: a dict that receives 'path', 'path_reason' and, after the backward, the CG's
        'cg_iterations', 'cg_residuals' [T], 'cg_converged' [T] and 'cg_indefinite' [T].
    Returns a 0-d tensor, once-differentiable.
    """
    K = _checks.positive_int("inner_steps", inner_steps)
    lr = positive_float("inner_lr", inner_lr)
    lam_ = positive_float("lam", lam)
    n_cg = _checks.positive_int("cg_steps", cg_steps)
    tol = nonneg_float("cg_tol", cg_tol)
    indef = check_choice("cg_indefinite", cg_indefinite, INDEFINITE)
    if check_choice("backend", backend, ("auto", "reference", "cpu", "cuda", "triton")) == "reference":
        if info is not None:
            info.update(path="reference", path_reason="backend='reference': explicit Hessian, dense solve per task")
        pure = _pure(fn)
        return ref.imaml_loss(pure, params, xs, ys, xq, yq, inner_lr=lr, inner_steps=K, lam=lam_, loss=loss)
    tasks = select_tasks(fn, params, xs, ys, xq, yq, loss=loss, backend=backend, task_map=task_map, hvp=hvp)
    if info is not None:
        info.update(path=tasks.path, path_reason=tasks.path_reason)
    run = _Run(tasks, xs, ys, xq, yq, lr, K, lam_, n_cg, tol, indef, None if backend == "auto" else backend, info)
    return _ImplicitStep.apply(run, torch.is_grad_enabled(), *params.values())


def _pure(fn: Any) -> Any:
    if isinstance(fn, nn.Module):
        module = fn
        return lambda p, x: torch.func.functional_call(module, p, (x,))
    return fn


def imaml_adapt(fn: Any, params: Mapping[str, torch.Tensor], xs: torch.Tensor, ys: torch.Tensor, *,
                inner_lr: float, inner_steps: int, lam: float, loss: object = "mse",
                backend: str = "auto") -> dict[str, torch.Tensor]:
    """φ_{t,K} of every task (the proximal inner loop), dict name -> [T, *shape], detached."""
    K = _checks.positive_int("inner_steps", inner_steps)
    lr, lam_ = positive_float("inner_lr", inner_lr), positive_float("lam", lam)
    be = check_choice("backend", backend, ("auto", "reference", "cpu", "cuda", "triton"))
    if be == "reference":
        return ref.adapt(_pure(fn), params, xs, ys, inner_lr=lr, inner_steps=K, lam=lam_, loss=loss)
    tasks = select_tasks(fn, params, xs, ys, None, None, loss=loss, backend=be, task_map="auto", hvp="auto")
    phi = inner_loop(tasks, list(params.values()), xs, ys, lr=lr, steps=K, lam=lam_,
                     sgd_backend=None if be == "auto" else be)
    return dict(zip(params, phi))


class iMAML(nn.Module):  # noqa: N801 - the algorithm's name
    """Implicit MAML around any ``nn.Module`` that is a function of its parameters.

    Args:
        model: the network; its trainable parameters are θ (BatchNorm with batch
            statistics or in eval mode; no active dropout).
        inner_lr: α of the inner gradient steps on Ls(φ) + (λ/2)‖φ − θ‖².
        inner_steps: K ≥ 1 (φ_0 = θ).
        lam: λ > 0, the proximal regularisation.
        cg_steps: the most CG iterations per meta-gradient.
        cg_tol: relative residual at which a task's CG stops (default 1e-10).
        cg_indefinite: 'raise' | 'truncate' when I + H/λ is not positive definite
            (see :func:`imaml_loss`).
        loss: 'mse' | 'cross_entropy' | callable loss(pred, y).
        backend: 'auto' | 'reference' | 'cpu' | 'cuda' | 'triton'.

    ``self(xs, ys, xq, yq)`` returns the meta-loss (mean query loss after adaptation);
    ``.backward()`` on it writes the implicit meta-gradient, averaged over tasks, into
    θ's ``.grad``. ``self.path`` / ``self.path_reason`` say which HVP ran
    ('fused_mlp_hvp', 'generic' or 'reference'); ``self.last_cg`` holds the CG report of
    the latest backward. ``task_map`` and ``hvp`` attributes ('auto') pick the generic
    path's flavours (see :mod:`fastmaml.family.tasks`).

    Example::

        imaml = fastmaml.iMAML(model, inner_lr=0.1, inner_steps=10, lam=2.0, cg_steps=5,
                               loss="cross_entropy")
        imaml(xs, ys, xq, yq).backward(); opt.step()
    """

    def __init__(self, model: nn.Module, inner_lr: float = 0.01, inner_steps: int = 5, lam: float = 1.0,
                 cg_steps: int = 5, cg_tol: float = 1e-10, cg_indefinite: str = "raise", loss: object = "mse",
                 backend: str = "auto") -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.inner_steps = _checks.positive_int("inner_steps", inner_steps)
        self.inner_lr = positive_float("inner_lr", inner_lr)
        self.lam = positive_float("lam", lam)
        self.cg_steps = _checks.positive_int("cg_steps", cg_steps)
        self.cg_tol = nonneg_float("cg_tol", cg_tol)
        self.cg_indefinite = check_choice("cg_indefinite", cg_indefinite, INDEFINITE)
        self.loss = loss
        self.backend = check_choice("backend", backend, ("auto", "reference", "cpu", "cuda", "triton"))
        self.task_map = "auto"
        self.hvp = "auto"
        self.path, self.path_reason = "", "not run yet"
        self.last_cg: dict = {}
        if not self._params():
            raise ValueError("model has no trainable parameters (requires_grad=True)")

    def _params(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def forward(self, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor) -> torch.Tensor:
        """Meta-loss of the meta-batch xs [T, Ns, ...], ys, xq [T, Nq, ...], yq (0-d)."""
        info: dict = {}
        self.last_cg = info
        out = imaml_loss(self.model, self._params(), xs, ys, xq, yq, inner_lr=self.inner_lr,
                         inner_steps=self.inner_steps, lam=self.lam, cg_steps=self.cg_steps, cg_tol=self.cg_tol,
                         cg_indefinite=self.cg_indefinite, loss=self.loss, backend=self.backend,
                         task_map=self.task_map, hvp=self.hvp, info=info)
        self.path, self.path_reason = info["path"], info["path_reason"]
        return out

    def adapt(self, xs: torch.Tensor, ys: torch.Tensor, steps: int | None = None) -> dict[str, torch.Tensor]:
        """Per-task φ after ``steps`` (default K) proximal inner steps on (xs, ys):
        dict name -> [T, *shape], detached (for evaluation)."""
        steps = self.inner_steps if steps is None else _checks.positive_int("steps", steps)
        return imaml_adapt(self.model, self._params(), xs, ys, inner_lr=self.inner_lr, inner_steps=steps,
                           lam=self.lam, loss=self.loss, backend=self.backend)

    def predict(self, fast: Mapping[str, torch.Tensor], xq: torch.Tensor) -> torch.Tensor:
        """Predictions of each task's adapted parameters ``fast`` on xq [T, N, ...]."""
        return predict(self.model, fast, xq)


def predict(model: nn.Module, fast: Mapping[str, torch.Tensor], xq: torch.Tensor) -> torch.Tensor:
    """model with per-task parameters ``fast`` (dict name -> [T, *shape]) on xq [T, N, ...]."""
    if not isinstance(fast, Mapping):
        raise TypeError(f"fast must be the dict returned by adapt(), got {type(fast).__name__}")
    _checks.tensor("xq", xq)
    if xq.dim() < 2:
        raise ValueError(f"xq must be [T, N, ...], got shape {tuple(xq.shape)}")
    for n, p in fast.items():
        if p.dim() == 0 or p.shape[0] != xq.shape[0]:
            raise ValueError(f"fast[{n!r}] must be [T={xq.shape[0]}, ...] like xq, got shape {tuple(p.shape)}")
    with torch.no_grad():
        return torch.stack([torch.func.functional_call(model, {n: p[t] for n, p in fast.items()}, (xq[t],))
                            for t in range(xq.shape[0])])
