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
