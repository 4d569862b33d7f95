"""Interleaved rounds (``--reps``): every method's round r before any round r+1, in process
and in capped child processes; the speedup is the median of the per-round ratios, with
their range in the table. No timings are asserted."""

from __future__ import annotations

import multiprocessing

import pytest
import torch

from fastmaml.bench import configs, harness, peers, report, runner
from fastmaml.bench.configs import Config

CFG = Config("sinusoid", 2, 1, 0.01, False)


def test_rounds_are_round_robin_in_process(monkeypatch):
    log: list[str] = []

    def fake_make(method, p, backend="auto"):
        model = configs.build_model(CFG.family).to(p.device)

        def step(i):
            log.append(method)
            return peers.loop_meta_grad(model, p.batches[i], CFG)

        return peers.Prepared(step, list, lambda o: None)

    monkeypatch.setattr(peers, "make", fake_make)
    s = runner.Settings(device=torch.device("cpu"), warmup=1, reps=2, min_reps=2, memory=False, check=False,
                        n_batches=2, rounds=3)
    res = harness.run_config(CFG, ["fastmaml", "a", "b"], s)
    # preparation (first call + 1 warm-up) one method after the other, then 3 rounds of 2 calls each
    assert log == ["fastmaml"] * 2 + ["a"] * 2 + ["b"] * 2 + (["fastmaml"] * 2 + ["a"] * 2 + ["b"] * 2) * 3
    for row in res.rows:
        assert len(row.times_s) == 6 and len(row.round_medians_s) == 3
    assert res.rounds == 3 and res.as_dict()["rounds"] == 3
    with pytest.raises(ValueError, match=r"Settings.rounds must be a positive int, got 0"):
        runner.Settings(device=torch.device("cpu"), rounds=0)


def test_speedup_is_the_median_of_per_round_ratios():
    def row(method, rounds):
        r = runner.Row(method, method, agrees=True, round_medians_s=rounds, times_s=list(rounds))
        r.median_s = sorted(rounds)[len(rounds) // 2]
        return r

    fast, peer = row("fastmaml", [1.0, 2.0, 4.0]), row("peer", [2.0, 2.0, 12.0])
    runner.assign_speedups([fast, peer])
    # per round 2/1, 2/2, 12/4: median 2 — the ratio of the overall medians would say 1
    assert peer.round_speedups == [2.0, 1.0, 3.0] and peer.speedup == 2.0
    assert fast.speedup == 1.0
    assert report.row_cells(peer)[6] == "2.00× (1.00–3.00)"
    res = runner.ConfigResult(CFG.as_dict(), [fast, peer], {}, 100, "sinusoid", rounds=3)
    assert "MEDIAN OF THE PER-ROUND RATIOS of 3 interleaved rounds" in report.text_table(res)
    # a row that did not run to the end gets no speedup, even with rounds measured
    peer.status = "failed"
    runner.assign_speedups([fast, peer])
    assert peer.speedup is None and "failed" in peer.speedup_note


def test_rounds_interleave_across_child_processes():
    s = runner.Settings(device=torch.device("cpu"), warmup=1, reps=2, min_reps=2, n_batches=2,
                        method_timeout_s=60.0, rounds=2)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = harness.run_config(Config("sinusoid", 3, 2, 0.01, False), ["fastmaml", "loop"], s)
    finally:
        torch.set_num_threads(n)
    for row in res.rows:
        if row.status == "unavailable":
            continue
        assert row.status == "ok", (row.method, row.reason)
        assert len(row.times_s) == 4 and len(row.round_medians_s) == 2 and len(row.info["rounds_s"]) == 2
        assert set(row.info["stages_s"]) == {"ready", "first", "warmup"}
    loop = res.rows[1]
    if res.rows[0].status == "ok":
        assert len(loop.round_speedups) == 2 and loop.speedup == pytest.approx(sum(loop.round_speedups) / 2)
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("fastmaml-bench")]


def test_a_method_failing_in_a_round_stops_and_gets_no_speedup(monkeypatch):
    calls = {"fastmaml": 0, "flaky": 0}

    def fake_make(method, p, backend="auto"):
        model = configs.build_model(CFG.family).to(p.device)

        def step(i):
            calls[method] += 1
            if method == "flaky" and calls[method] == 5:  # first call, warm-up, round 1 (2 calls), then fails
                raise RuntimeError("out of memory in round 2")
            return peers.loop_meta_grad(model, p.batches[i], CFG)

        return peers.Prepared(step, list, lambda o: None, info=lambda: {"path": "flaky-path"})

    monkeypatch.setattr(peers, "make", fake_make)
    s = runner.Settings(device=torch.device("cpu"), warmup=1, reps=2, min_reps=2, memory=False, check=True,
                        n_batches=2, rounds=3)
    res = harness.run_config(CFG, ["fastmaml", "flaky"], s)
    fast, flaky = res.rows
    assert calls == {"fastmaml": 8, "flaky": 5}, "no round after the failing one"
    assert flaky.status == "failed" and "out of memory in round 2" in flaky.reason
    assert flaky.round_medians_s and len(flaky.times_s) == 2 and flaky.info["path"] == "flaky-path"
    assert fast.agrees is True and flaky.agrees is True and fast.speedup == 1.0
    assert flaky.speedup is None and "flaky failed" in flaky.speedup_note
