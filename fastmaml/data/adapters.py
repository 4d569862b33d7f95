"""Adapters from other libraries' meta-batches to fastmaml's ``(xs, ys, xq, yq)``
tensors, so existing loaders keep working.

* learn2learn: a list of per-task ``(x, y)`` pairs (what ``TaskDataset.sample()``
  returns, one call per task), each task's examples split into support and query.
* torchmeta: ``{"train": (x [T, Ns, ...], y [T, Ns]), "test": (x [T, Nq, ...], y)}``
  (what ``BatchMetaDataLoader`` yields).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fastmaml.data.sampler import Episode


def _pair(obj: object, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(obj, (tuple, list)) or len(obj) < 2:
        raise TypeError(f"{what} must be an (x, y) pair of tensors, got {type(obj).__name__}")
    x, y = obj[0], obj[1]
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"{what} must hold tensors, got {type(x).__name__} and {type(y).__name__}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{what}: x and y must have the same number of examples, got {x.shape[0]} and {y.shape[0]}")
    return x, y


def from_learn2learn(tasks: Sequence[tuple[torch.Tensor, torch.Tensor]], k_shot: int, *,
                     n_way: int | None = None) -> Episode:
    """Stack learn2learn-style tasks ``[(x [n, ...], y [n]), ...]`` into a meta-batch.

    Each task's examples are split per class: the first ``k_shot`` examples of every
    label (in the task's order) form the support set, the rest the query set (as
    learn2learn's ``partition_task``). Labels must already be 0..N−1 (``RemapLabels``);
    every task needs the same number of examples per class. ``n_way`` checks the
    number of classes when given.
    """
    if not isinstance(tasks, (list, tuple)) or not tasks:
        raise ValueError(f"tasks must be a non-empty list of (x, y) pairs, got {type(tasks).__name__}")
    if isinstance(k_shot, bool) or not isinstance(k_shot, int) or k_shot < 1:
        raise ValueError(f"k_shot must be an int >= 1, got {k_shot!r}")
    sup_idx, qry_idx, n0 = [], [], None
    pairs = [_pair(t, f"tasks[{i}]") for i, t in enumerate(tasks)]
    for i, (x, y) in enumerate(pairs):
        if y.dim() != 1 or y.is_floating_point():
            raise ValueError(f"tasks[{i}]: y must be integer labels [n], got {y.dtype} shape {tuple(y.shape)}")
        labels, counts = torch.unique(y, return_counts=True)
        n = labels.numel()
        if n0 is None:
            n0 = n
        if n != n0 or (n_way is not None and n != n_way):
            raise ValueError(f"tasks[{i}] has {n} classes, expected {n_way if n_way is not None else n0}")
        if not torch.equal(labels.cpu(), torch.arange(n)):
            raise ValueError(f"tasks[{i}]: labels must be 0..{n - 1} (remap them), got {labels.tolist()}")
        if int(counts.min()) <= k_shot or int(counts.min()) != int(counts.max()):
            raise ValueError(f"tasks[{i}]: every class needs the same number (> k_shot={k_shot}) of examples, "
                             f"got {counts.tolist()}")
        order = torch.sort(y, stable=True).indices.view(n, -1)  # [n_way, per_class] in task order
        sup_idx.append(order[:, :k_shot].reshape(-1))
        qry_idx.append(order[:, k_shot:].reshape(-1))
    if len({tuple(x.shape[1:]) for x, _ in pairs}) != 1 or len({int(q.numel()) for q in qry_idx}) != 1:
        raise ValueError("tasks must share the example shape and the number of examples per class")
    xs = torch.stack([x[i] for (x, _), i in zip(pairs, sup_idx)])
    ys = torch.stack([y[i] for (_, y), i in zip(pairs, sup_idx)]).long()
    xq = torch.stack([x[i] for (x, _), i in zip(pairs, qry_idx)])
    yq = torch.stack([y[i] for (_, y), i in zip(pairs, qry_idx)]).long()
    return xs, ys, xq, yq


def from_torchmeta(batch: Mapping[str, object]) -> Episode:
    """``{"train": (x, y), "test": (x, y)}`` (x [T, N, ...], y [T, N]) to contiguous
    ``(xs, ys, xq, yq)``; integer labels become int64."""
    if not isinstance(batch, Mapping) or "train" not in batch or "test" not in batch:
        raise TypeError("batch must be a torchmeta-style mapping with 'train' and 'test' (x, y) pairs, got "
                        f"{type(batch).__name__}" + (f" with keys {sorted(batch)}" if isinstance(batch, Mapping) else ""))
    out = []
    for key in ("train", "test"):
        x, y = _pair(batch[key], f"batch[{key!r}]")
        if x.dim() < 2 or y.dim() < 2 or y.shape[:2] != x.shape[:2]:
            raise ValueError(f"batch[{key!r}] must be x [T, N, ...] and y [T, N, ...], got shapes "
                             f"{tuple(x.shape)} and {tuple(y.shape)}")
        out += [x.contiguous(), (y if y.is_floating_point() else y.long()).contiguous()]
    if out[0].shape[0] != out[2].shape[0]:
        raise ValueError(f"batch: 'train' and 'test' must hold the same tasks, got T={out[0].shape[0]} and "
                         f"T={out[2].shape[0]}")
    return out[0], out[1], out[2], out[3]
