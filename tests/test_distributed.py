"""fastmaml.distributed on real gloo process groups (2 and 3 ranks on 127.0.0.1): the
task-weighted meta-gradient with an uneven split equals one process over all tasks
(float64, 1e-12), with one all-reduce per step; a dead rank gives an error, not a hang."""

from __future__ import annotations

import datetime
import multiprocessing as mp
import socket
import time

import pytest
import torch
from torch import nn

import fastmaml
from fastmaml import distributed as fd

T = 7  # 4/3 over 2 ranks, 3/2/2 over 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2)).double()
    maml = fastmaml.MAML(model, inner_lr=0.1, inner_steps=2, learn_lr=True, loss="mse")
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(T, n, d, generator=g, dtype=torch.float64) for n, d in ((5, 3), (5, 2), (6, 3), (6, 2))]
    return maml, data


def _init(rank: int, world: int, port: int, timeout_s: float) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world, timeout=datetime.timedelta(seconds=timeout_s))


def _worker(rank: int, world: int, port: int, queue) -> None:
    try:
        _init(rank, world, port, 30.0)
        maml, (xs, ys, xq, yq) = _problem()
        with torch.no_grad():  # ranks start from different θ: broadcast makes them rank 0's
            for p in maml.parameters():
                p.add_(rank)
        fd.broadcast_parameters(maml)
        lo, hi = fd.task_range(T, rank, world)
        calls = []
        real = torch.distributed.all_reduce

        def counting(*a, **k):
            calls.append(1)
            return real(*a, **k)

        torch.distributed.all_reduce = counting
        loss = maml(xs[lo:hi], ys[lo:hi], xq[lo:hi], yq[lo:hi])
        loss.backward()
        mean_loss = fd.average_gradients(maml.parameters(), local_tasks=hi - lo, total_tasks=T,
                                         extra=loss.detach())
        torch.distributed.all_reduce = real
        queue.put((rank, hi - lo, len(calls), [p.grad.numpy().copy() for p in maml.parameters()], float(mean_loss)))
        fd.shutdown()
    except BaseException as e:  # report instead of hanging the parent
        queue.put((rank, -1, -1, repr(e), 0.0))


def _dead_rank_worker(rank: int, world: int, port: int, queue) -> None:
    try:
        _init(rank, world, port, 3.0)
        if rank == 1:
            return  # dies before the step's all-reduce
        p = nn.Parameter(torch.ones(4))
        p.grad = torch.ones(4)
        t0 = time.perf_counter()
        try:
            fd.average_gradients([p], local_tasks=1, total_tasks=2)
            queue.put(("no error", time.perf_counter() - t0))
        except RuntimeError as e:
            queue.put((type(e).__name__ + ": " + str(e)[:200], time.perf_counter() - t0))
    except BaseException as e:
        queue.put(("setup failed: " + repr(e), -1.0))


def _spawn(target, world: int, timeout: float = 120.0, n_results: int | None = None) -> list:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, queue)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.time() + timeout
    out = []
    for _ in range(n_results if n_results is not None else world):
        try:
            out.append(queue.get(timeout=max(1.0, deadline - time.time())))
        except Exception:  # queue.Empty: a worker hung or died without reporting
            break
    for p in procs:
        p.join(max(1.0, deadline - time.time()))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "distributed workers hung"
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_meta_gradient_equals_one_process_over_all_tasks(world):
    maml, (xs, ys, xq, yq) = _problem()
    loss = maml(xs, ys, xq, yq)
    loss.backward()
    want = [p.grad for p in maml.parameters()]
    assert len(want) == 5  # θ and the learned inner learning rate
    res = sorted(_spawn(_worker, world), key=lambda r: r[0])
    assert len(res) == world, res
    counts = [r[1] for r in res]
    assert counts == ([4, 3] if world == 2 else [3, 2, 2]), res
    for rank, _, n_calls, grads, mean_loss in res:
        assert n_calls == 1  # one bucketed all-reduce per step
        for g, w in zip(grads, want):
            torch.testing.assert_close(torch.from_numpy(g), w, rtol=0, atol=1e-12)
        assert abs(mean_loss - float(loss.detach())) <= 1e-12


def test_plain_average_would_be_wrong():
    """The task weighting matters: with 4/3 tasks the unweighted mean of the ranks'
    gradients differs from the meta-gradient (so the test above can fail)."""
    maml, (xs, ys, xq, yq) = _problem()
    parts = []
    for lo, hi in (fd.task_range(T, r, 2) for r in range(2)):
        maml.zero_grad()
        maml(xs[lo:hi], ys[lo:hi], xq[lo:hi], yq[lo:hi]).backward()
        parts.append([p.grad.clone() for p in maml.parameters()])
    maml.zero_grad()
    maml(xs, ys, xq, yq).backward()
    plain = [(a + b) / 2 for a, b in zip(*parts)]
    assert max(float((u - p.grad).abs().max()) for u, p in zip(plain, maml.parameters())) > 1e-6


def test_dead_rank_errors_after_timeout_not_hang():
    res = _spawn(_dead_rank_worker, 2, timeout=90.0, n_results=1)
    assert len(res) == 1, res
    msg, waited = res[0]
    assert msg.startswith("RuntimeError") or "Error" in msg, msg
    assert 0 <= waited < 60, (msg, waited)


def test_task_range_and_argument_checks():
    for Tn in range(1, 12):
        for world in range(1, Tn + 1):
            ranges = [fd.task_range(Tn, r, world) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == Tn
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            sizes = [hi - lo for lo, hi in ranges]
            assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    with pytest.raises(ValueError, match="world_size"):
        fd.task_range(2, 0, 3)
    with pytest.raises(ValueError, match="rank"):
        fd.task_range(4, 2, 2)
    p = nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="local_tasks must equal"):
        fd.average_gradients([p], local_tasks=1, total_tasks=2)
    with pytest.raises(ValueError, match="local_tasks"):
        fd.average_gradients([p], local_tasks=3, total_tasks=2)
    assert fd.rank_and_world() == (0, 1)
