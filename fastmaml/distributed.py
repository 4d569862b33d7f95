"""Multi-process meta-training on ``torch.distributed``: the meta-batch split over ranks,
the meta-gradients averaged with one all-reduce per step.

The meta-loss is a mean over tasks, M = (1/T) Σ_t L_t. Rank r holds n_r tasks (the
counts differ by at most one when P does not divide T, see :func:`task_range`) and its
``MAML`` returns M_r = (1/n_r) Σ_{t∈r} L_t, so

    ∇M = Σ_r (n_r / T) ∇M_r,

which :func:`average_gradients` forms by scaling each rank's gradients by n_r / T and
summing them with **one** all-reduce over a single flat buffer holding every gradient
(θ and learned learning rates alike); a plain average of the ranks' gradients would
weigh the tasks of the smaller shares more. Parameters without a gradient on some rank
contribute zeros, so every rank passes the same buffer layout.

A typical loop (run it under ``torchrun --nproc-per-node P``)::

    from fastmaml import distributed as fd
    rank, world = fd.init_from_env()            # gloo on CPU, NCCL on CUDA
    fd.broadcast_parameters(maml)               # the same θ everywhere
    sampler = EpisodeSampler(data, 5, 1, 15, seed=0, rank=rank, world_size=world)
    for it in range(iterations):
        xs, ys, xq, yq = sampler.sample(T)      # this rank's share of the T tasks
        opt.zero_grad()
        maml(xs, ys, xq, yq).backward()
        fd.average_gradients(maml.parameters(), local_tasks=xs.shape[0], total_tasks=T)
        opt.step()

A rank that dies makes the others' collectives fail (gloo: the peer's connection
closes; otherwise the process group's ``timeout``), rather than wait forever.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Iterable

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300.0


def task_range(T: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous share [lo, hi) of T tasks over ``world_size`` ranks:
    the first T mod P ranks get ⌈T/P⌉ tasks, the others ⌊T/P⌋. Raises ValueError when
    a rank would get no task (T < P)."""
    for name, v in (("T", T), ("world_size", world_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    if T < world_size:
        raise ValueError(f"T (the meta-batch) must be >= world_size={world_size} so that every rank gets a task, "
                         f"got {T}")
    q, r = divmod(T, world_size)
    lo = rank * q + min(rank, r)
    return lo, lo + q + (1 if rank < r else 0)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    return (dist.get_rank(), dist.get_world_size()) if is_initialized() else (0, 1)


def init_from_env(backend: str | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                  device: torch.device | str | None = None) -> tuple[int, int]:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT; LOCAL_RANK picks the CUDA device) and return
    (rank, world_size). Without those variables it returns (0, 1) and starts nothing.
    ``backend`` defaults to NCCL for CUDA devices and gloo otherwise; collectives that
    wait longer than ``timeout_s`` raise instead of hanging."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return 0, 1
    if is_initialized():
        return rank_and_world()
    dev = torch.device(device) if device is not None else None
    if backend is None:
        backend = "nccl" if dev is not None and dev.type == "cuda" else "gloo"
    if backend == "nccl" and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend=backend, timeout=_dt.timedelta(seconds=float(timeout_s)))
    return rank_and_world()


def shutdown() -> None:
    """Leave the process group (no-op without one)."""
    if is_initialized():
        dist.destroy_process_group()


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors]) if tensors else torch.zeros(0)


def broadcast_parameters(module_or_params: torch.nn.Module | Iterable[torch.Tensor], src: int = 0) -> None:
    """Copy rank ``src``'s parameters to every rank (one broadcast of a flat buffer)."""
    if not is_initialized():
        return
    params = list(module_or_params.parameters() if isinstance(module_or_params, torch.nn.Module)
                  else module_or_params)
    if not params:
        return
    buf = _flat([p.detach() for p in params])
    dist.broadcast(buf, src=src)
    with torch.no_grad():
        for p, b in zip(params, buf.split([p.numel() for p in params])):
            p.copy_(b.view_as(p))


def average_gradients(params: Iterable[torch.Tensor], *, local_tasks: int, total_tasks: int,
                      extra: torch.Tensor | None = None, group: object = None) -> torch.Tensor | None:
    """Replace each parameter's ``.grad`` (that of this rank's mean meta-loss over its
    ``local_tasks`` tasks) by the gradient of the mean over all ``total_tasks`` tasks,
    Σ_r (n_r / T) ∇M_r, with one all-reduce of one flattened buffer. Parameters that
    require grad but have none get the summed gradient too (zeros from this rank).
    ``extra`` (e.g. the detached local meta-loss) rides in the same buffer and comes
    back task-weighted the same way (the global mean), or None when not given.
    Without a process group the gradients are left as they are (then local_tasks must
    equal total_tasks)."""
    for name, v in (("local_tasks", local_tasks), ("total_tasks", total_tasks)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if local_tasks > total_tasks:
        raise ValueError(f"local_tasks must be <= total_tasks={total_tasks}, got {local_tasks}")
    params = [p for p in params if p.requires_grad]
    if not is_initialized():
        if local_tasks != total_tasks:
            raise ValueError(f"without a process group local_tasks must equal total_tasks, got {local_tasks} "
                             f"and {total_tasks}")
        return extra
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    if extra is not None:
        ref = grads[0] if grads else extra
        grads.append(extra.detach().reshape(-1).to(dtype=ref.dtype, device=ref.device))
    if not grads:
        return None
    buf = _flat(grads).mul_(local_tasks / total_tasks)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)  # type: ignore[arg-type]
    parts = buf.split([g.numel() for g in grads])
    for p, b in zip(params, parts):
        p.grad = b.view_as(p).clone() if p.grad is None else p.grad.copy_(b.view_as(p))
    return parts[-1].reshape(extra.shape).to(extra.dtype) if extra is not None else None


def barrier() -> None:
    if is_initialized():
        dist.barrier()
