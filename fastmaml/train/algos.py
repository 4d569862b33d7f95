"""The meta-learning algorithms ``python -m fastmaml.train --algo NAME`` can run.

An algorithm is a builder ``build(model, cfg) -> nn.Module`` registered in ``ALGOS``;
the module it returns provides what the training loop calls:

* one meta-step, :func:`meta_step`: for MAML and iMAML ``module(xs, ys, xq, yq)`` is
  the meta-loss (0-d) of a meta-batch and its ``.backward()`` fills the ``.grad`` of
  ``module.parameters()``; Reptile's ``module(xs, ys)`` fills ``.grad`` itself with
  θ − mean_t φ_{t,K} (adapted on the support sets) and returns the detached mean
  post-adaptation support loss, with no backward;
* ``module.adapt(xs, ys, steps=s)`` → per-task fast weights and
  ``module.predict(fast, xq)`` → predictions, for evaluation;
* ``module.eval_steps(requested)`` (optional) → the number of inner steps it can be
  evaluated with (a variant whose rates are defined for K steps only returns K).

``fomaml`` is ``maml`` with ``--first-order``. ``imaml`` is implicit MAML with the
config's ``lam`` and ``cg_steps`` (``cg_indefinite="truncate"``: a task whose
I + H/λ is not positive definite at φ_K stops its CG at the last iterate instead of
ending the run). The outer optimizer (``--outer-optimizer``) steps on whichever
``.grad`` the meta-step wrote.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

import fastmaml
from fastmaml.train.configs import Config

Builder = Callable[[nn.Module, Config], nn.Module]


def _maml(model: nn.Module, cfg: Config) -> nn.Module:
    return fastmaml.MAML(model, inner_lr=cfg.inner_lr, inner_steps=cfg.inner_steps, first_order=cfg.first_order,
                         loss=_loss(cfg))


def _fomaml(model: nn.Module, cfg: Config) -> nn.Module:
    return _maml(model, cfg.override(first_order=True))


def _loss(cfg: Config) -> str:
    return "cross_entropy" if cfg.classification else "mse"


def _imaml(model: nn.Module, cfg: Config) -> nn.Module:
    return fastmaml.iMAML(model, inner_lr=cfg.inner_lr, inner_steps=cfg.inner_steps, lam=cfg.lam,
                          cg_steps=cfg.cg_steps, cg_indefinite="truncate", loss=_loss(cfg))


def _reptile(model: nn.Module, cfg: Config) -> nn.Module:
    return fastmaml.Reptile(model, inner_lr=cfg.inner_lr, inner_steps=cfg.inner_steps, loss=_loss(cfg))


ALGOS: dict[str, Builder] = {"maml": _maml, "fomaml": _fomaml, "imaml": _imaml, "reptile": _reptile}


def build(name: str, model: nn.Module, cfg: Config) -> nn.Module:
    if name not in ALGOS:
        raise ValueError(f"algo must be one of {sorted(ALGOS)}, got {name!r}")
    return ALGOS[name](model, cfg)


def meta_step(module: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Fill the ``.grad`` of ``module``'s parameters for one meta-batch ``(xs, ys, xq, yq)``
    and return the (detached) loss to log: Reptile's support loss after adaptation, the
    others' meta-loss."""
    xs, ys, xq, yq = batch
    if isinstance(module, fastmaml.Reptile):
        return module(xs, ys)
    loss = module(xs, ys, xq, yq)
    loss.backward()
    return loss.detach()


def eval_steps(module: nn.Module, requested: int) -> int:
    """Inner steps for evaluation: ``requested``, unless the algorithm's rates are defined
    for its training steps only (per-step learning rates), then those."""
    custom = getattr(module, "eval_steps", None)
    if callable(custom):
        return int(custom(requested))
    if getattr(module, "lr_mode", "scalar") in ("per_step_layer", "per_step_element"):
        return int(module.inner_steps)  # type: ignore[arg-type]
    return requested
