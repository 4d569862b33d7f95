"""``--method-timeout``: each method in a spawned child process (~2-3 s per child here),
rebuilt bitwise, killed at the cap, reported when it dies. No timings are asserted."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os

import pytest
import torch

from fastmaml.bench import harness, isolation, runner
from fastmaml.bench.configs import Config


ISO_CFG = Config("sinusoid", 3, 2, 0.01, False)


def _iso_settings(cap):
    return runner.Settings(device=torch.device("cpu"), warmup=1, reps=2, min_reps=2, n_batches=2,
                            method_timeout_s=cap)


@pytest.fixture(scope="module")
def isolated_run():
    """The same tiny config run in-process and isolated (two children), on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        inproc = harness.run_config(ISO_CFG, ["fastmaml", "loop"], _iso_settings(None))
        iso = harness.run_config(ISO_CFG, ["fastmaml", "loop"], _iso_settings(60.0))
    finally:
        torch.set_num_threads(n)
    return inproc, iso


def test_child_rebuilds_a_bitwise_identical_problem(isolated_run):
    s = _iso_settings(None)
    a, b = runner.make_problem(ISO_CFG, s), runner.make_problem(ISO_CFG, s)
    for x, y in zip([*a.model.state_dict().values(), *(t for bt in a.batches for t in bt)],
                    [*b.model.state_dict().values(), *(t for bt in b.batches for t in bt)]):
        assert x.dtype == y.dtype and torch.equal(x, y)
    digest = runner.problem_digest(a)
    # the digest sees one ulp in one batch entry, and another seed
    b.batches[1][0].view(-1)[0] = torch.nextafter(b.batches[1][0].view(-1)[0], torch.tensor(float("inf")))
    assert runner.problem_digest(b) != digest
    assert runner.problem_digest(runner.make_problem(ISO_CFG.with_(seed=1), s)) != digest
    # what the spawned children built (the parent checks it too: a mismatch is a failed row)
    _, iso = isolated_run
    for row in iso.rows:
        assert row.info["problem_sha256"] == digest


def test_isolated_run_matches_in_process(isolated_run):
    inproc, iso = isolated_run
    assert [r.method for r in iso.rows] == ["fastmaml", "loop"]
    for a, b in zip(inproc.rows, iso.rows):
        if a.status == "unavailable":
            assert b.status == "unavailable"
            continue
        assert b.status == "ok", (b.method, b.reason)
        assert b.agrees is True and b.rel_diff == pytest.approx(a.rel_diff, rel=1e-3, abs=1e-9)
        assert b.first_s > 0 and b.median_s > 0 and len(b.times_s) == len(a.times_s) == 2
        # the same fields are filled in as in-process, plus the isolation bookkeeping
        filled = lambda r: {k for k, v in dataclasses.asdict(r).items() if v is not None and k != "info"}  # noqa: E731
        assert filled(a) == filled(b)
        assert set(a.info) <= set(b.info)
        info = b.info
        assert info["isolated"] is True and info["timeout_s"] == 60.0 and info["exit_code"] == 0
        assert info["threads"] == 1, "the parent's thread count is applied in the child"
        assert set(info["stages_s"]) == {"ready", "first", "warmup"} and 0 < info["wall_s"] < 60
        assert b.memory_kind == a.memory_kind
    if iso.rows[0].status == "ok":
        assert iso.rows[1].speedup == pytest.approx(iso.rows[1].median_s / iso.rows[0].median_s)
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("fastmaml-bench")]


def test_timed_out_method_is_killed_and_gets_no_speedup():
    from fastmaml.bench import report

    res = harness.run_config(ISO_CFG, ["fastmaml", "loop"], _iso_settings(0.05))
    for row in res.rows:
        assert row.status == "timed out"
        assert row.reason.startswith("no result within 0.05 s (")
        assert row.speedup is None and row.median_s is None and row.times_s == []
        assert row.info["isolated"] is True and row.info["timeout_s"] == 0.05
        with pytest.raises(ProcessLookupError):  # killed and reaped: no such process left
            os.kill(row.info["pid"], 0)
        with pytest.raises(ProcessLookupError):  # nor anything in its process group
            os.killpg(row.info["pid"], 0)
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("fastmaml-bench")]
    table, md = report.text_table(res), report.markdown_table(res)
    assert "TIMED OUT: no result within 0.05 s" in table and "TIMED OUT" in md
    assert json.loads(json.dumps(res.as_dict()))["rows"][0]["status"] == "timed out"
    assert "TIMED OUT" in report.legend()


def test_a_child_that_dies_is_a_failed_row():
    assert "SIGKILL" in isolation._exit_reason(-9) and "OOM" in isolation._exit_reason(-9)
    assert "exited with code 1" in isolation._exit_reason(1)
    # a child whose rebuilt problem differs from the parent's is not measured
    row = isolation.run_isolated(ISO_CFG, "loop", _iso_settings(60.0), None, None, digest="not-the-digest")
    assert row.status == "failed" and "differs from the parent's" in row.reason and row.median_s is None
    with pytest.raises(ProcessLookupError):
        os.kill(row.info["pid"], 0)
