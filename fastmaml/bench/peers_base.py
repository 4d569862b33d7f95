"""What every benchmark method shares: the problem it is given (:class:`Problem`), what
its factory returns (:class:`Prepared`), the exception of a method that cannot run here
(:class:`Unavailable`) and small helpers of the torch methods. The methods themselves:
``peers_torch`` (loop, higher, vmap, compile), ``peers_jax`` and ``peers`` (fastmaml and
the registry).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastmaml.bench.configs import Batch, Config

LEARN2LEARN_NOTE = ("learn2learn's MAML.clone/adapt algorithm written out: learn2learn itself "
                    "does not build on Python 3.11, so it is not installed")


class Unavailable(Exception):
    """The method cannot run here; ``str(exc)`` says why."""


@dataclass
class Problem:
    cfg: Config
    model: nn.Module  # the initial network θ, float32, on ``device``; methods copy it
    batches: list[Batch]  # rotated meta-batches on ``device``
    device: torch.device


@dataclass
class Prepared:
    step: Callable[[int], Any]  # one meta-step on batch i; returns the method's raw gradient
    to_torch: Callable[[Any], list[torch.Tensor]]  # raw gradient → torch tensors, param order
    sync: Callable[[Any], None]  # wait until the raw gradient is computed
    framework: str = "torch"  # "torch" | "jax"
    info: Callable[[], dict] = field(default=lambda: {})  # e.g. fastmaml's path, compile stats
    notes: list[str] = field(default_factory=list)


def _loss_fn(loss: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if loss == "mse":
        return F.mse_loss  # mean over points and output features
    if loss == "cross_entropy":
        return F.cross_entropy  # mean over points, int64 labels
    raise ValueError(f"loss must be 'mse' or 'cross_entropy', got {loss!r}")


def _torch_sync(device: torch.device) -> Callable[[Any], None]:
    if device.type == "cuda":
        return lambda _out: torch.cuda.synchronize(device)
    return lambda _out: None


def _identity(out: Any) -> list[torch.Tensor]:
    return list(out)


def _copy_model(p: Problem, dtype: torch.dtype | None = None) -> nn.Module:
    m = copy.deepcopy(p.model)
    if dtype is not None:
        m = m.to(dtype)
    return m
