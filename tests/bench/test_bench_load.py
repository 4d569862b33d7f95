"""``--load``: the competitor process starts, keeps a core busy, and is gone afterwards —
also when the measurement in between raises; the machine's sgemm rate. No timings are
asserted beyond "positive"."""

from __future__ import annotations

import os
import time

import pytest
import torch

from fastmaml.bench import load, measure


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_competitor_runs_busy_and_is_gone_after():
    c = load.Competitor().start()
    pid = c.pid
    try:
        assert c.alive() and not _gone(pid)
        time.sleep(0.5)
        cpu = load._cpu_seconds(pid)
        assert cpu is not None and cpu > 0.05, "the competitor burns CPU"
        with open(f"/proc/{pid}/status") as f:
            threads = int(next(line for line in f if line.startswith("Threads:")).split()[1])
        assert threads <= 4, "one compute thread (plus the interpreter's few helpers)"
    finally:
        info = c.stop()
    assert _gone(pid) and not c.alive()
    assert info["on"] is True and info["pid"] == pid and info["kind"] == load.KIND
    assert info["wall_s"] > 0.5 and info["cpu_s"] > 0 and 0 < info["busy_fraction"] <= 1.5
    assert c.stop() == {"on": False}  # idempotent


def test_competitor_is_stopped_when_the_measurement_raises():
    with pytest.raises(KeyboardInterrupt):
        with load.Competitor() as c:
            pid = c.pid
            raise KeyboardInterrupt  # Ctrl-C during the measurements
    assert _gone(pid)


def test_competitor_loop_refuses_bad_options():
    with pytest.raises(SystemExit):
        load.main(["--size", "0"])


def test_matmul_rate_restores_threads_and_checks_arguments():
    n = torch.get_num_threads()
    assert measure.matmul_rate(1, n=64, reps=2) > 0
    assert torch.get_num_threads() == n
    for bad in ({"threads": 0}, {"threads": 1, "n": 0}, {"threads": 1, "reps": True}):
        with pytest.raises(ValueError, match=r"must be a positive int, got"):
            measure.matmul_rate(**bad)
    m = measure.machine_rate(n=64, reps=2)
    assert m["threads_all"] == measure.usable_cores() == len(os.sched_getaffinity(0))
    assert m["gflops_1thread"] > 0 and m["gflops_all"] > 0 and m["n"] == 64


def test_competitor_waits_until_the_load_average_shows_it(monkeypatch):
    seq = iter([0.2, 0.3, 0.8])  # the base, then rising past base + 0.5

    monkeypatch.setattr(os, "getloadavg", lambda: (next(seq, 0.8), 0.0, 0.0))
    c = load.Competitor(settle_s=30.0).start()
    try:
        assert 0.9 < c.settled_s < 10, "one 1-s poll below base + 0.5, then done"
    finally:
        info = c.stop()
    assert info["settled_s"] == c.settled_s
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.0, 0.0))  # never rises: bounded by settle_s
    with load.Competitor(settle_s=1.5) as c2:
        assert 1.5 <= c2.settled_s < 4
