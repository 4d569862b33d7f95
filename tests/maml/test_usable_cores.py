"""tasks.usable_cores: the cores task_threads="auto" may use — the affinity mask less the
cores other processes keep busy (the smaller of the 1-minute load average and the
runnable threads outside this process now), measured once. Affinity, load average and
/proc are faked here."""

from __future__ import annotations

import os

import pytest
import torch

from fastmaml.maml import tasks


def _fake(monkeypatch, tmp_path, *, mask, cpu_count, loadavg, running, own_running=1, proc=True):
    monkeypatch.setattr(tasks, "_USABLE_CORES", None)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(mask)))
    monkeypatch.setattr(os, "cpu_count", lambda: cpu_count)
    monkeypatch.setattr(os, "getloadavg", lambda: (loadavg, loadavg, loadavg))
    load = tmp_path / "loadavg"
    task_dir = tmp_path / "task"
    if proc:
        load.write_text(f"{loadavg:.2f} 0.50 0.40 {running}/321 4242\n")
        for tid in range(3):  # this process's threads: own_running of them running
            (task_dir / str(tid)).mkdir(parents=True, exist_ok=True)
            state = "R" if tid < own_running else "S"
            (task_dir / str(tid) / "stat").write_text(f"{tid} (py thread) {state} 1 2 3\n")
    monkeypatch.setattr(tasks, "_PROC_LOADAVG", str(load))
    monkeypatch.setattr(tasks, "_PROC_TASKS", str(task_dir))


@pytest.mark.parametrize("kw,want", [
    # a steady competitor on one core: average 1.2, 2 runnable now besides ours -> k = 1
    (dict(mask=4, cpu_count=4, loadavg=1.2, running=3), 3),
    # a load that just started shows now but not yet in the average: k = round(0.1) = 0
    (dict(mask=4, cpu_count=4, loadavg=0.1, running=3), 4),
    # a job that ended a minute ago is still in the average, nothing runs now: k = 0
    (dict(mask=4, cpu_count=4, loadavg=3.0, running=1), 4),
    # two other threads busy on a 2-core machine: at least one worker
    (dict(mask=2, cpu_count=2, loadavg=2.5, running=4), 1),
    # a 2-core mask on an 8-core host, the host fully busy: k = 8 x 2/8 = 2 -> 1
    (dict(mask=2, cpu_count=8, loadavg=8.0, running=9), 1),
    # the same host a quarter busy: k = 2 x 2/8 = 0.5 -> rounds to 1 busy core of our 2
    (dict(mask=2, cpu_count=8, loadavg=2.0, running=3), 1),
    # our own running threads are not the others' load
    (dict(mask=4, cpu_count=4, loadavg=3.0, running=3, own_running=3), 4),
    # no /proc: the load average alone cannot tell others' load from ours -> the mask
    (dict(mask=3, cpu_count=8, loadavg=5.0, running=0, proc=False), 3),
])
def test_usable_cores_from_affinity_and_load(monkeypatch, tmp_path, kw, want):
    _fake(monkeypatch, tmp_path, **kw)
    assert tasks.usable_cores() == want


def test_measured_once_and_used_by_task_threads_auto(monkeypatch, tmp_path):
    _fake(monkeypatch, tmp_path, mask=4, cpu_count=4, loadavg=1.2, running=3)
    assert tasks.usable_cores() == 3
    (tmp_path / "loadavg").write_text("0.00 0.00 0.00 1/321 4242\n")  # the load went: still the first figure
    assert tasks.usable_cores() == 3
    safe = tasks.module_fn(torch.nn.Conv2d(1, 1, 3))
    xs = torch.zeros(8, 2, 1, 5, 5)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        assert tasks.choose_workers("auto", "loop", safe, xs, xs) == 3  # min(torch threads 4, usable 3, T 8)
        torch.set_num_threads(2)
        assert tasks.choose_workers("auto", "loop", safe, xs, xs) == 2
        assert tasks.choose_workers(4, "loop", safe, xs, xs) == 4  # an explicit count is taken as given
    finally:
        torch.set_num_threads(n)


def test_op_threads_rule(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    monkeypatch.setattr(tasks, "_USABLE_CORES", 3)
    assert tasks.op_threads("auto", torch.device("cpu")) == 3
    assert tasks.op_threads(2, torch.device("cpu")) == 0  # an explicit task_threads: torch's setting
    assert tasks.op_threads("auto", torch.device("meta")) == 0
    monkeypatch.setattr(tasks, "_USABLE_CORES", 4)
    assert tasks.op_threads("auto", torch.device("cpu")) == 0  # nothing busy: unchanged


def _conv_problem():
    from torch import nn
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    g = torch.Generator().manual_seed(1)
    xs, xq = torch.randn(2, 3, 1, 8, 8, generator=g), torch.randn(2, 4, 1, 8, 8, generator=g)
    ys, yq = torch.randint(0, 3, (2, 3), generator=g), torch.randint(0, 3, (2, 4), generator=g)
    return net, (xs, ys, xq, yq)


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs 2 intra-op threads to confine to 1")
def test_generic_meta_step_runs_on_the_usable_cores(monkeypatch):
    """With other processes holding cores (usable_cores below torch's thread count), the
    generic meta-step's forward and backward (adjoint._run, adjoint._adjoint) run on the
    usable cores, torch's setting is restored after each, and the meta-gradient is the
    unconfined one."""
    import fastmaml
    from fastmaml.maml import adjoint
    net, data = _conv_problem()
    seen = []
    for name in ("_run", "_adjoint"):
        real = getattr(adjoint, name)
        monkeypatch.setattr(adjoint, name, lambda *a, _real=real, _name=name: (
            seen.append((_name, torch.get_num_threads())), _real(*a))[1])
    n0 = torch.get_num_threads()

    def grads(usable, first_order):
        monkeypatch.setattr(tasks, "_USABLE_CORES", usable)
        seen.clear()
        maml = fastmaml.MAML(net, inner_lr=0.1, inner_steps=2, loss="cross_entropy", first_order=first_order)
        loss = maml(*data)
        assert torch.get_num_threads() == n0
        g = torch.autograd.grad(loss, list(net.parameters()))
        assert torch.get_num_threads() == n0
        assert maml.path == "generic"
        return g, set(seen)

    for first_order in (False, True):
        g_free, seen_free = grads(n0, first_order)
        g_busy, seen_busy = grads(1, first_order)
        assert {n for _, n in seen_free} == {n0} and {n for _, n in seen_busy} == {1}
        assert {"_run", "_adjoint"} <= {name for name, _ in seen_busy}
        for a, b in zip(g_free, g_busy):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs 2 intra-op threads to confine to 1")
@pytest.mark.parametrize("front", ["MAML", "maml_loss"])
def test_mlp_op_runs_on_the_usable_cores(monkeypatch, front):
    """The MLP route's op (the factored path here: torch ops) runs on the usable cores too,
    on every call of one MAML or maml_loss."""
    import fastmaml
    from torch import nn
    from fastmaml.ops._maml_mlp import function as FN
    seen = []
    real = FN.run_factored
    monkeypatch.setattr(FN, "run_factored", lambda *a: (seen.append(torch.get_num_threads()), real(*a))[1])
    monkeypatch.setattr(tasks, "_USABLE_CORES", 1)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 5))  # 132,613 parameters: factored
    xs, xq = torch.randn(2, 3, 512), torch.randn(2, 4, 512)
    ys, yq = torch.randint(0, 5, (2, 3)), torch.randint(0, 5, (2, 4))
    n0 = torch.get_num_threads()
    maml = fastmaml.MAML(net, inner_lr=0.1, inner_steps=2, loss="cross_entropy")
    for _ in range(2):
        if front == "MAML":
            loss = maml(xs, ys, xq, yq)
        else:
            loss = fastmaml.maml_loss(net, dict(net.named_parameters()), 0.1, xs, ys, xq, yq, steps=2,
                                      loss="cross_entropy")
        assert torch.get_num_threads() == n0
        loss.backward()
    assert seen == [1, 1]
