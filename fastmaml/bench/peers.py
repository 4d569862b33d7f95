"""The methods the benchmark times: fastmaml and the peers a user would otherwise pick.

Each peer is written plainly and idiomatically, the way its users write it:

- ``loop``: a Python loop over tasks; per task K inner steps with
  ``torch.autograd.grad(create_graph=True)`` and one ``backward`` of the task's query
  loss. This is learn2learn's ``MAML.clone()/adapt()`` algorithm, written out, because
  learn2learn itself does not build on Python 3.11, so it is not installed here.
- ``higher``: ``higher.innerloop_ctx`` per task with a differentiable SGD.
- ``vmap``: torch.func in eager mode: ``grad`` of the mean over tasks of
  ``vmap(task_loss)``, the inner loop unrolled with ``torch.func.grad``.
- ``compile``: the strongest compiled form of it, ``torch.compile`` of the function that
  returns ``torch.func.grad`` of the vmapped meta-loss (and ``compile-ro``: the same with
  ``mode="reduce-overhead"``, CUDA graphs, on a GPU only).
- ``jax``: ``jax.jit(jax.grad(mean(vmap(task_loss))))`` of the same network with the same
  weights, written in ``jax.numpy``/``jax.lax``.
- ``fastmaml``: ``fastmaml.MAML(...)`` (whatever path it picks), and for MLPs
  ``fastmaml-generic``: the same model hidden inside an opaque module so that the
  wrapper cannot recognise the MLP and takes its generic path.

First order: the inner gradients are constants (``create_graph=False``; ``detach``;
``jax.lax.stop_gradient``), so dθ_K/dθ = I.

Every factory takes a :class:`Problem` and returns a :class:`Prepared` whose ``step(i)``
runs one meta-step on the rotated meta-batch ``i`` and returns the meta-gradient with
respect to the model's parameters (in ``model.parameters()`` order), or raises
:class:`Unavailable` with the reason.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from fastmaml.bench.peers_base import (LEARN2LEARN_NOTE, Prepared, Problem, Unavailable, _copy_model, _identity,
                                       _torch_sync)
from fastmaml.bench.peers_jax import jax_forward, make_jax
from fastmaml.bench.peers_torch import (loop_meta_grad, make_compiled, make_higher, make_loop, make_vmap,
                                        reference_meta_grad)

__all__ = ["LEARN2LEARN_NOTE", "METHODS", "PEERS", "Prepared", "Problem", "Unavailable", "jax_forward",
           "loop_meta_grad", "make", "make_fastmaml", "reference_meta_grad"]


# ---------------------------------------------------------------------------------
# fastmaml
# ---------------------------------------------------------------------------------

class _Opaque(nn.Module):
    """Hides a model's structure so that fastmaml.MAML cannot pick a model-specific path."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def make_fastmaml(p: Problem, backend: str = "auto", generic: bool = False) -> Prepared:
    import fastmaml

    MAML = getattr(fastmaml, "MAML", None)
    if MAML is None:
        raise Unavailable("fastmaml.MAML is not available in this checkout (the MAML layer is not merged yet)")
    if generic and p.cfg.fam.mlp_widths is None:
        raise Unavailable("fastmaml-generic is measured for MLPs only (other models always take the generic path)")
    cfg = p.cfg
    model = _copy_model(p)
    params = list(model.parameters())
    net = _Opaque(model) if generic else model
    maml = MAML(net, inner_lr=cfg.inner_lr, inner_steps=cfg.K, first_order=cfg.first_order,
                loss=cfg.fam.loss, backend=backend)

    def step(i: int) -> list[torch.Tensor]:
        for q in params:
            q.grad = None
        maml(*p.batches[i]).backward()
        return [q.grad if q.grad is not None else torch.zeros_like(q) for q in params]

    def info() -> dict:
        return {"path": str(getattr(maml, "path", "?")), "backend": backend}

    return Prepared(step, _identity, _torch_sync(p.device), info=info)


# ---------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------

METHODS: dict[str, str] = {
    "fastmaml": "fastmaml.MAML (auto path)",
    "fastmaml-generic": "fastmaml.MAML, generic path (model hidden in an opaque module)",
    "loop": "loop over tasks, autograd.grad(create_graph=True) (learn2learn's algorithm)",
    "higher": "higher.innerloop_ctx, one backward per task",
    "vmap": "torch.func grad(vmap(task_loss)), eager",
    "compile": "torch.compile(torch.func.grad(vmap meta-loss))",
    "compile-ro": "torch.compile(..., mode='reduce-overhead') (CUDA graphs)",
    "jax": "jax.jit(jax.grad(mean(vmap(task_loss))))",
}
PEERS = ("loop", "higher", "vmap", "compile", "compile-ro", "jax")


def make(method: str, p: Problem, backend: str = "auto") -> Prepared:
    """Prepare ``method`` (a key of :data:`METHODS`) on problem ``p``."""
    if method == "fastmaml":
        return make_fastmaml(p, backend)
    if method == "fastmaml-generic":
        return make_fastmaml(p, backend, generic=True)
    if method == "loop":
        return make_loop(p)
    if method == "higher":
        return make_higher(p)
    if method == "vmap":
        return make_vmap(p)
    if method == "compile":
        return make_compiled(p)
    if method == "compile-ro":
        return make_compiled(p, "reduce-overhead")
    if method == "jax":
        if os.environ.get("FASTMAML_BENCH_NO_JAX") == "1":
            raise Unavailable("disabled by FASTMAML_BENCH_NO_JAX=1")
        return make_jax(p)
    raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
