"""fastmaml.bench.heap (``--malloc``): every method process gets the same glibc malloc
settings, the user's own settings win, and the benchmark's process is left as it was."""

from __future__ import annotations

import multiprocessing
import os

import pytest

from fastmaml.bench import heap, report


def _env_of_child(q):
    q.put({k: v for k, v in os.environ.items() if k.startswith("MALLOC_")})


@pytest.fixture
def clean_env(monkeypatch):
    for k in [k for k in os.environ if k.startswith("MALLOC_")]:
        monkeypatch.delenv(k)


def test_tuned_reaches_the_method_processes_and_is_undone(clean_env):
    line, added = heap.apply("tuned", per_process=True)
    try:
        assert sorted(added) == sorted(heap.TUNED)
        assert all(os.environ[k] == v for k, v in heap.TUNED.items())
        assert "MALLOC_MMAP_THRESHOLD_=268435456" in line and "every method's process" in line
        ctx = multiprocessing.get_context("spawn")  # how the harness starts the method processes
        q = ctx.Queue()
        p = ctx.Process(target=_env_of_child, args=(q,))
        p.start()
        seen = q.get(timeout=60)
        p.join(60)
        assert seen == heap.TUNED
    finally:
        heap.restore(added)
    assert heap.user_settings() == {}


def test_user_settings_win(clean_env, monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1048576")
    line, added = heap.apply("tuned", per_process=True)
    assert added == ["MALLOC_TRIM_THRESHOLD_"] and os.environ["MALLOC_MMAP_THRESHOLD_"] == "1048576"
    assert "MALLOC_MMAP_THRESHOLD_=1048576" in line
    heap.restore(added)
    assert heap.user_settings() == {"MALLOC_MMAP_THRESHOLD_": "1048576"}


@pytest.mark.parametrize("choice,per_process", [("inherit", True), ("tuned", False)])
def test_inherit_and_in_process_change_nothing(clean_env, choice, per_process):
    line, added = heap.apply(choice, per_process=per_process)
    assert added == [] and heap.user_settings() == {}
    assert line.startswith("malloc: inherited (glibc's defaults")
    with pytest.raises(SystemExit, match="--malloc"):
        heap.apply("fast", per_process=True)


def test_the_report_names_the_setting():
    lines = report.header({"malloc": "malloc: every method's process runs with X", "rounds": 3})
    assert "malloc: every method's process runs with X" in lines
