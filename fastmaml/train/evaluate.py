"""Meta-validation / meta-test: adapt to each fixed episode's support set, score its
query set, and report the mean with its 95 % interval 1.96·std/√n (the MAML code's
protocol, std over episodes).

Classification scores accuracy; regression the query MSE. In a distributed run each
rank scores its share of every meta-batch of episodes and one all-reduce sums
(Σ score, Σ score², n), so all ranks return the same figures.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from fastmaml import distributed as fd
from fastmaml.data.sampler import Episode


def episode_scores(module: nn.Module, episode: Episode, steps: int, classification: bool) -> torch.Tensor:
    """Per-task score [T] after ``steps`` inner steps: query accuracy or query MSE."""
    xs, ys, xq, yq = episode
    fast = module.adapt(xs, ys, steps=steps)  # type: ignore[operator]
    with torch.no_grad():
        pred = module.predict(fast, xq)  # type: ignore[operator]
    if classification:
        return (pred.argmax(-1) == yq).double().mean(dim=1)
    return ((pred - yq) ** 2).double().flatten(1).mean(dim=1)


def evaluate(module: nn.Module, episodes: Sequence[Episode], steps: int, classification: bool) -> dict:
    """{"mean", "ci95", "std", "n", "steps", "metric"} over all tasks of ``episodes``."""
    rank, world = fd.rank_and_world()
    acc = torch.zeros(3, dtype=torch.float64)
    for ep in episodes:
        T = ep[0].shape[0]
        if T >= world:
            lo, hi = fd.task_range(T, rank, world)
        else:  # fewer episodes than ranks: rank 0 scores them
            lo, hi = (0, T) if rank == 0 else (0, 0)
        if hi > lo:
            s = episode_scores(module, tuple(t[lo:hi] for t in ep), steps, classification)  # type: ignore[arg-type]
            acc += torch.stack([s.sum(), (s * s).sum(), torch.tensor(float(s.numel()), dtype=torch.float64)]).cpu()
    if fd.is_initialized():
        buf = acc.to(_collective_device())
        torch.distributed.all_reduce(buf)
        acc = buf.cpu()
    total, sq, n = float(acc[0]), float(acc[1]), int(acc[2])
    mean = total / n
    std = math.sqrt(max(sq / n - mean * mean, 0.0))
    return {"metric": "accuracy" if classification else "mse", "mean": mean, "std": std,
            "ci95": 1.96 * std / math.sqrt(n), "n": n, "steps": steps}


def _collective_device() -> torch.device:
    backend = torch.distributed.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
