"""Benchmark configurations (docs/DESIGN.md §5): the networks and synthetic tasks of the
real shapes (the FLOP count of a meta-step: ``fastmaml.bench.flops``).

Every configuration is a :class:`Config`: a network family (the model and the task
shapes), the meta-batch size T, the inner steps K, the inner learning rate and the order.
Data are synthetic but have the real shapes and dtypes: sinusoid regression tasks
(amplitude U[0.1, 5], phase U[0, π], x U[−5, 5]), and N-way K-shot classification
tasks with Gaussian images and int64 labels ``0..n_way−1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from torch import nn


@dataclass(frozen=True)
class Family:
    """A network and its task shapes."""

    name: str
    loss: str  # "mse" | "cross_entropy"
    n_support: int  # points per task in the support set
    n_query: int  # points per task in the query set
    input_shape: tuple[int, ...]  # one point's shape
    n_way: int  # classes (cross_entropy) or output features (mse)
    description: str
    mlp_widths: tuple[int, ...] | None = None  # set for the MLP families


FAMILIES: dict[str, Family] = {
    "sinusoid": Family(
        "sinusoid", "mse", 10, 10, (1,), 1,
        "MLP 1-40-40-1 ReLU, MSE, 10 support / 10 query points", (1, 40, 40, 1)),
    "wide_mlp": Family(
        "wide_mlp", "cross_entropy", 5, 75, (784,), 5,
        "MLP 784-256-128-64-64-5 ReLU (Omniglot non-conv MAML net), CE, 5-way 1-shot, 15 query/class",
        (784, 256, 128, 64, 64, 5)),
    "omniglot": Family(
        "omniglot", "cross_entropy", 5, 75, (1, 28, 28), 5,
        "4x[conv3x3 64, BN, ReLU, stride 2] + linear, 28x28x1, CE, 5-way 1-shot, 15 query/class"),
    "miniimagenet": Family(
        "miniimagenet", "cross_entropy", 25, 75, (3, 84, 84), 5,
        "4x[conv3x3 32, BN, ReLU, maxpool 2] + linear, 84x84x3, CE, 5-way 5-shot, 15 query/class"),
}

# The MAML paper's settings: T, the inner step counts, the inner lr (docs/DESIGN.md §5).
PAPER = {
    "sinusoid": dict(T=(25, 1000), K=(5,), inner_lr=0.01),
    "wide_mlp": dict(T=(32,), K=(1, 5), inner_lr=0.4),
    "omniglot": dict(T=(32,), K=(1, 5), inner_lr=0.4),
    "miniimagenet": dict(T=(2,), K=(5,), inner_lr=0.01),
}


@dataclass(frozen=True)
class Config:
    family: str
    T: int
    K: int
    inner_lr: float
    first_order: bool = False
    seed: int = 0
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def fam(self) -> Family:
        return FAMILIES[self.family]

    @property
    def order(self) -> str:
        return "first" if self.first_order else "second"

    @property
    def name(self) -> str:
        return f"{self.family} T={self.T} K={self.K} {self.order}-order"

    def with_(self, **kw) -> "Config":
        return replace(self, **kw)

    def as_dict(self) -> dict:
        f = self.fam
        return dict(name=self.name, family=self.family, T=self.T, K=self.K, inner_lr=self.inner_lr,
                    order=self.order, loss=f.loss, n_support=f.n_support, n_query=f.n_query,
                    input_shape=list(f.input_shape), model=f.description)


# ---------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------

def _mlp(widths: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _conv4(in_ch: int, hidden: int, pool: bool, flat: int, n_way: int) -> nn.Sequential:
    # BatchNorm in batch-statistics mode (track_running_stats=False), as the MAML code
    # uses it: every forward normalises with the statistics of the batch it sees.
    layers: list[nn.Module] = []
    c = in_ch
    for _ in range(4):
        if pool:
            layers += [nn.Conv2d(c, hidden, 3, padding=1), nn.BatchNorm2d(hidden, track_running_stats=False),
                       nn.ReLU(), nn.MaxPool2d(2)]
        else:
            layers += [nn.Conv2d(c, hidden, 3, stride=2, padding=1),
                       nn.BatchNorm2d(hidden, track_running_stats=False), nn.ReLU()]
        c = hidden
    layers += [nn.Flatten(), nn.Linear(flat, n_way)]
    return nn.Sequential(*layers)


def build_model(family: str, seed: int = 0) -> nn.Sequential:
    """The family's network in float32 on the CPU, PyTorch's default init under ``seed``."""
    torch.manual_seed(seed)
    f = FAMILIES[family]
    if f.mlp_widths is not None:
        return _mlp(f.mlp_widths)
    if family == "omniglot":  # 28 → 14 → 7 → 4 → 2 (stride 2, padding 1)
        return _conv4(1, 64, False, 64 * 2 * 2, f.n_way)
    if family == "miniimagenet":  # 84 → 42 → 21 → 10 → 5 (maxpool 2)
        return _conv4(3, 32, True, 32 * 5 * 5, f.n_way)
    raise ValueError(f"family must be one of {sorted(FAMILIES)}, got {family!r}")


# ---------------------------------------------------------------------------------
# Synthetic tasks
# ---------------------------------------------------------------------------------

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def make_batch(cfg: Config, index: int, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> Batch:
    """One meta-batch ``(xs, ys, xq, yq)``: xs ``[T, Ns, *input_shape]``; ys ``[T, Ns, 1]``
    float (sinusoid) or ``[T, Ns]`` int64 labels; the same for the query set."""
    f = cfg.fam
    g = torch.Generator().manual_seed(1000 * cfg.seed + index + 1)
    T = cfg.T
    if f.loss == "mse":
        amp = torch.rand(T, 1, 1, generator=g, dtype=torch.float64) * 4.9 + 0.1
        phase = torch.rand(T, 1, 1, generator=g, dtype=torch.float64) * math.pi
        xs = torch.rand(T, f.n_support, 1, generator=g, dtype=torch.float64) * 10 - 5
        xq = torch.rand(T, f.n_query, 1, generator=g, dtype=torch.float64) * 10 - 5
        ys, yq = amp * torch.sin(xs - phase), amp * torch.sin(xq - phase)
        out = (xs, ys, xq, yq)
        return tuple(t.to(device=device, dtype=dtype) for t in out)  # type: ignore[return-value]
    xs = torch.randn(T, f.n_support, *f.input_shape, generator=g, dtype=torch.float64)
    xq = torch.randn(T, f.n_query, *f.input_shape, generator=g, dtype=torch.float64)
    # Labels 0..n_way−1, each class equally often, in a different order per task.
    ys = torch.stack([torch.randperm(f.n_support, generator=g) % f.n_way for _ in range(T)])
    yq = torch.stack([torch.randperm(f.n_query, generator=g) % f.n_way for _ in range(T)])
    return (xs.to(device=device, dtype=dtype), ys.to(device), xq.to(device=device, dtype=dtype), yq.to(device))
