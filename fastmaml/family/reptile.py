"""Reptile (Nichol et al. 2018), batched over tasks on fastmaml's kernels.

Per task t: K plain SGD steps on the support loss from φ_0 = θ,
φ_{k+1} = φ_k − α ∇Ls_t(φ_k) — all tasks at once: one batched gradient per step (the
fused ``ops.mlp_loss_and_grad`` for MLPs, the generic path's vmapped or looped autograd
elsewhere) and one fused multi-tensor ``ops.sgd_step`` for every tensor of every task.
The meta-update direction

    d = θ − (1/T) Σ_t φ_{t,K}

is accumulated into θ's ``.grad``, so any outer optimizer applies it (plain Reptile is
SGD with learning rate ε on it: θ ← θ − ε d). No meta-gradient is differentiated:
memory is one set of per-task parameters and one step's activations.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fastmaml import _checks
from fastmaml.family.imaml import predict as _predict
from fastmaml.family.problem import check_choice, positive_float, select_tasks
from fastmaml.family.tasks import inner_loop
from fastmaml.maml.tasks import confined, op_threads
from fastmaml.reference import reptile as ref

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")


def reptile_direction(fn: Any, params: Mapping[str, torch.Tensor], xs: torch.Tensor, ys: torch.Tensor, *,
                      inner_lr: float, inner_steps: int, loss: object = "mse", backend: str = "auto",
                      task_map: str = "auto", info: dict | None = None
                      ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(d = θ − mean_t φ_{t,K} as dict name -> tensor, mean_t Ls_t(φ_{t,K}) 0-d), detached.

    fn: an ``nn.Module`` (an ``nn.Sequential`` MLP takes the fused MLP ops) or a pure
    ``fn(params: dict, x)``; params: dict name -> θ; xs [T, Ns, ...], ys [T, Ns, ...];
    inner_lr α > 0; inner_steps K ≥ 1; loss 'mse' | 'cross_entropy' | callable;
    backend 'auto' | 'reference' (a loop over tasks) | 'cpu' | 'cuda' | 'triton';
    task_map 'auto' | 'vmap' | 'loop'; ``info`` receives 'path' and 'path_reason'."""
    K = _checks.positive_int("inner_steps", inner_steps)
    lr = positive_float("inner_lr", inner_lr)
    if check_choice("backend", backend, BACKENDS) == "reference":
        if info is not None:
            info.update(path="reference", path_reason="backend='reference': a loop over tasks")
        pure = fn
        if isinstance(fn, nn.Module):
            module = fn

            def pure(p: dict, x: torch.Tensor) -> torch.Tensor:
                return torch.func.functional_call(module, p, (x,))
        return ref.reptile_direction(pure, params, xs, ys, inner_lr=lr, inner_steps=K, loss=loss)
    tasks = select_tasks(fn, params, xs, ys, None, None, loss=loss, backend=backend, task_map=task_map, hvp="auto")
    if info is not None:
        # Reptile takes no HVP: on an MLP, the fused gradients only
        info.update(path="fused_mlp" if tasks.path == "fused_mlp_hvp" else tasks.path, path_reason=tasks.grad_reason)
    theta = list(params.values())
    with confined(op_threads("auto", xs.device)):  # the cores other processes leave (MAML's rule)
        phi = inner_loop(tasks, theta, xs, ys, lr=lr, steps=K, lam=0.0,
                         sgd_backend=None if backend == "auto" else backend)
        with torch.no_grad():
            val = tasks.losses(phi, xs, ys).mean()
            d = {n: th.detach() - p.mean(0) for n, th, p in zip(params, theta, phi)}
    return d, val


class Reptile(nn.Module):
    """Reptile around any ``nn.Module`` that is a function of its parameters.

    Args:
        model: the network; its trainable parameters are θ.
        inner_lr: α of the K inner SGD steps.
        inner_steps: K ≥ 1.
        loss: 'mse' | 'cross_entropy' | callable loss(pred, y).
        backend: 'auto' | 'reference' | 'cpu' | 'cuda' | 'triton'.

    ``self(xs, ys)`` adapts every task on its support set and *accumulates* into each
    θ's ``.grad`` the direction θ − mean_t φ_{t,K} (zero the grads between meta-steps as
    usual); it returns the mean post-adaptation support loss, detached. With
    ``torch.optim.SGD(model.parameters(), lr=eps)`` that is plain Reptile.
    ``self.path`` / ``self.path_reason`` say which implementation ran.

    Example::

        reptile = fastmaml.Reptile(model, inner_lr=0.02, inner_steps=5, loss="cross_entropy")
        opt.zero_grad(); reptile(xs, ys); opt.step()
    """

    def __init__(self, model: nn.Module, inner_lr: float = 0.01, inner_steps: int = 5, loss: object = "mse",
                 backend: str = "auto") -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.inner_lr = positive_float("inner_lr", inner_lr)
        self.inner_steps = _checks.positive_int("inner_steps", inner_steps)
        self.loss = loss
        self.backend = check_choice("backend", backend, BACKENDS)
        self.task_map = "auto"
        self.path, self.path_reason = "", "not run yet"
        if not self._params():
            raise ValueError("model has no trainable parameters (requires_grad=True)")

    def _params(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def _run(self, xs: torch.Tensor, ys: torch.Tensor, steps: int) -> tuple[dict, torch.Tensor, dict]:
        info: dict = {}
        d, val = reptile_direction(self.model, self._params(), xs, ys, inner_lr=self.inner_lr, inner_steps=steps,
                                   loss=self.loss, backend=self.backend, task_map=self.task_map, info=info)
        self.path, self.path_reason = info["path"], info["path_reason"]
        return d, val, info

    def forward(self, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        """Accumulate θ − mean_t φ_{t,K} into θ's .grad; return mean_t Ls_t(φ_{t,K})."""
        params = self._params()
        d, val, _ = self._run(xs, ys, self.inner_steps)
        with torch.no_grad():
            for n, p in params.items():
                if p.grad is None:
                    p.grad = d[n].clone()
                else:
                    p.grad.add_(d[n])
        return val

    def adapt(self, xs: torch.Tensor, ys: torch.Tensor, steps: int | None = None) -> dict[str, torch.Tensor]:
        """Per-task φ after ``steps`` (default K) SGD steps: dict name -> [T, *shape]."""
        steps = self.inner_steps if steps is None else _checks.positive_int("steps", steps)
        tasks = select_tasks(self.model, self._params(), xs, ys, None, None, loss=self.loss,
                             backend="auto" if self.backend == "reference" else self.backend,
                             task_map=self.task_map, hvp="auto")
        be = self.backend
        phi = inner_loop(tasks, list(self._params().values()), xs, ys, lr=self.inner_lr, steps=steps, lam=0.0,
                         sgd_backend=be if be in ("reference", "cpu", "cuda", "triton") else None)
        return dict(zip(self._params(), phi))

    def predict(self, fast: Mapping[str, torch.Tensor], xq: torch.Tensor) -> torch.Tensor:
        """Predictions of each task's adapted parameters ``fast`` on xq [T, N, ...]."""
        return _predict(self.model, fast, xq)
