"""Episode-sampling throughput: fastmaml's vectorised :class:`~fastmaml.data.EpisodeSampler`
against a per-episode Python sampler built like learn2learn's ``TaskDataset`` with
``NWays``/``KShots``/``LoadData``/``RemapLabels`` (a description list built per episode,
each example loaded by ``dataset[i]`` from an in-memory ``(x, y)`` dataset, labels
remapped, the task's examples stacked, then the T tasks stacked into a meta-batch), on
synthetic data of the real shapes, in the same run.

    python -m fastmaml.bench.episodes                 # both configurations
    python -m fastmaml.bench.episodes --reps 50 --json /tmp/episodes.json

Both samplers read the same in-memory images and return float32 episodes: kept as
float32 (the rows the targets are about: learn2learn's in-memory datasets hold the
transformed tensors), or as uint8 (then both convert to [0, 1] floats, the loop per
example as a ``ToTensor``-like transform does). The two samplers' meta-batches
alternate, so both see the same machine load; reported are the medians over
``--reps`` meta-batches of the wall time (``time.perf_counter``) and episodes/s = T /
median.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastmaml.data import EpisodeSampler

CONFIGS = {  # name: (classes, per class, shape, N, K, Q, T)
    "omniglot-5w1s-T32": (1100, 20, (1, 28, 28), 5, 1, 1, 32),
    "miniimagenet-5w5s-T4": (64, 600, (3, 84, 84), 5, 5, 15, 4),
}
TARGETS = {"omniglot-5w1s-T32": 20.0, "miniimagenet-5w5s-T4": 2.0}
STORAGE = ("float32", "uint8")  # the images as kept in memory (float32: the targets' rows)


class InMemoryDataset:
    """An ``(x, y)`` dataset indexed one example at a time, as learn2learn wraps one."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.x[i]
        return (x if x.is_floating_point() else x.float().div_(255.0)), int(self.y[i])


class LoopTaskSampler:
    """learn2learn-style per-episode sampling: for each task, NWays picks N labels,
    KShots picks K+Q indices of each, LoadData loads each example by ``dataset[i]``,
    RemapLabels maps the labels to 0..N−1; the task is stacked and split into support
    and query; then the T tasks are stacked."""

    def __init__(self, dataset: InMemoryDataset, n_way: int, k_shot: int, q_query: int, seed: int = 0) -> None:
        self.dataset, self.n_way, self.k_shot, self.q_query = dataset, n_way, k_shot, q_query
        self.rng = random.Random(seed)
        self.labels_to_indices: dict[int, list[int]] = {}
        for i, lab in enumerate(dataset.y.tolist()):  # built once, like l2l's MetaDataset
            self.labels_to_indices.setdefault(lab, []).append(i)
        self.labels = sorted(self.labels_to_indices)

    def task(self) -> tuple[torch.Tensor, ...]:
        classes = self.rng.sample(self.labels, self.n_way)  # NWays
        description = [(i, c) for c in classes
                       for i in self.rng.sample(self.labels_to_indices[c], self.k_shot + self.q_query)]  # KShots
        data = [self.dataset[i] for i, _ in description]  # LoadData
        remap = {c: n for n, c in enumerate(classes)}  # RemapLabels
        x = torch.stack([d[0] for d in data])
        y = torch.tensor([remap[d[1]] for d in data])
        per = self.k_shot + self.q_query
        sup = torch.tensor([j for j in range(len(data)) if j % per < self.k_shot])
        qry = torch.tensor([j for j in range(len(data)) if j % per >= self.k_shot])
        return x[sup], y[sup], x[qry], y[qry]

    def sample(self, T: int) -> tuple[torch.Tensor, ...]:
        tasks = [self.task() for _ in range(T)]
        return tuple(torch.stack([t[i] for t in tasks]) for i in range(4))


@dataclass
class Result:
    config: str
    storage: str
    T: int
    loop_s: float
    fastmaml_s: float

    @property
    def speedup(self) -> float:
        return self.loop_s / self.fastmaml_s


def _alternating_medians(fns: list[Callable[[], object]], reps: int, warmup: int = 2) -> list[float]:
    for f in fns:
        for _ in range(warmup):
            f()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for f, ts in zip(fns, times):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def run_config(name: str, storage: str, reps: int, seed: int = 0) -> Result:
    C, M, shape, N, K, Q, T = CONFIGS[name]
    g = torch.Generator().manual_seed(seed)
    if storage == "uint8":
        data = torch.randint(0, 256, (C, M, *shape), generator=g, dtype=torch.uint8)
    else:
        data = torch.rand((C, M, *shape), generator=g, dtype=torch.float32)
    fast = EpisodeSampler(data, N, K, Q, seed=seed, dtype=torch.float32)
    loop = LoopTaskSampler(InMemoryDataset(data.view(C * M, *shape), torch.arange(C).repeat_interleave(M)),
                           N, K, Q, seed=seed)
    a, b = fast.sample(T), loop.sample(T)
    if [t.shape for t in a] != [t.shape for t in b] or [t.dtype for t in a] != [t.dtype for t in b]:
        raise RuntimeError(f"{name}: the samplers disagree on shapes/dtypes: {[t.shape for t in a]} vs "
                           f"{[t.shape for t in b]}")
    loop_s, fast_s = _alternating_medians([lambda: loop.sample(T), lambda: fast.sample(T)], reps)
    return Result(name, storage, T, loop_s, fast_s)


def _cpu_model() -> str:
    try:
        from fastmaml.bench.report import machine_info

        return str(machine_info(torch.device("cpu"))["cpu"])
    except Exception:  # the harness is optional here
        return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> list[Result]:
    p = argparse.ArgumentParser(prog="python -m fastmaml.bench.episodes", description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--config", choices=sorted(CONFIGS), action="append", default=None)
    p.add_argument("--storage", choices=STORAGE, action="append", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.reps < 1:
        p.error(f"--reps must be >= 1, got {args.reps}")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = [run_config(n, st, args.reps) for n in (args.config or list(CONFIGS))
               for st in (args.storage or list(STORAGE))]
    print(f"episode sampling, cpu ({_cpu_model()}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.reps}")
    print(f"{'config':<22}{'storage':>8}{'loop ms':>10}{'loop ep/s':>12}{'fastmaml ms':>13}{'fastmaml ep/s':>15}{'speedup':>9}"
          f"{'target':>8}")
    for r in results:
        target = TARGETS[r.config] if r.storage == "float32" else None
        verdict = "" if target is None else f"{target:>7.0f}x {'met' if r.speedup >= target else 'NOT met'}"
        print(f"{r.config:<22}{r.storage:>8}{r.loop_s * 1e3:>10.2f}{r.T / r.loop_s:>12.0f}{r.fastmaml_s * 1e3:>13.3f}"
              f"{r.T / r.fastmaml_s:>15.0f}{r.speedup:>8.1f}x{verdict}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": _cpu_model(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                       "reps": args.reps, "results": [{**r.__dict__, "speedup": r.speedup,
                                                       "target": TARGETS[r.config] if r.storage == "float32" else None}
                                                      for r in results]}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
