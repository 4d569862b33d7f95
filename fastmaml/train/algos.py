"""The meta-learning algorithms ``python -m fastmaml.train --algo NAME`` can run.

An algorithm is a builder ``build(model, cfg) -> nn.Module`` registered in ``ALGOS``;
the module it returns provides what the training loop calls:

* ``module(xs, ys, xq, yq)`` → the meta-loss (0-d) of a meta-batch, whose
  ``.backward()`` fills the ``.grad`` of ``module.parameters()``;
* ``module.adapt(xs, ys, steps=s)`` → per-task fast weights and
  ``module.predict(fast, xq)`` → predictions, for evaluation;
* ``module.eval_steps(requested)`` (optional) → the number of inner steps it can be
  evaluated with (a variant whose rates are defined for K steps only returns K).

``fomaml`` is ``maml`` with ``--first-order``. Other algorithms (e.g. iMAML, Reptile)
plug in by adding a builder here.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

import fastmaml
from fastmaml.train.configs import Config

Builder = Callable[[nn.Module, Config], nn.Module]


def _maml(model: nn.Module, cfg: Config) -> nn.Module:
    return fastmaml.MAML(model, inner_lr=cfg.inner_lr, inner_steps=cfg.inner_steps, first_order=cfg.first_order,
                         loss="cross_entropy" if cfg.classification else "mse")


def _fomaml(model: nn.Module, cfg: Config) -> nn.Module:
    return _maml(model, cfg.override(first_order=True))


ALGOS: dict[str, Builder] = {"maml": _maml, "fomaml": _fomaml}


def build(name: str, model: nn.Module, cfg: Config) -> nn.Module:
    if name not in ALGOS:
        raise ValueError(f"algo must be one of {sorted(ALGOS)}, got {name!r}")
    return ALGOS[name](model, cfg)


def eval_steps(module: nn.Module, requested: int) -> int:
    """Inner steps for evaluation: ``requested``, unless the algorithm's rates are defined
    for its training steps only (per-step learning rates), then those."""
    custom = getattr(module, "eval_steps", None)
    if callable(custom):
        return int(custom(requested))
    if getattr(module, "lr_mode", "scalar") in ("per_step_layer", "per_step_element"):
        return int(module.inner_steps)  # type: ignore[arg-type]
    return requested
