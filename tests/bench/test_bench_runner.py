"""One configuration's run: the float32 agreement rule (tolerance from the float32 loop's own
error, perturbed inputs), no speedup for disagreeing methods, slow, unavailable and failing
methods reported. No timings are asserted."""

from __future__ import annotations

import pytest
import torch

from fastmaml.bench import configs, harness, peers, runner
from fastmaml.bench.configs import Config


@pytest.mark.parametrize("cfg", [Config("sinusoid", 4, 2, 0.01, False), Config("sinusoid", 4, 2, 0.01, True),
                                 Config("omniglot", 1, 1, 0.4, False)], ids=lambda c: c.name)
def test_harness_checks_peers_in_float32(cfg):
    """In float32 the harness's agreement rule accepts the peers that compute MAML."""
    s = runner.Settings(device=torch.device("cpu"), warmup=1, reps=1, min_reps=1, memory=False, n_batches=2)
    methods = ["loop", "higher"] + (["vmap"] if cfg.fam.mlp_widths else [])
    res = harness.run_config(cfg, methods, s)
    for row in res.rows:
        if row.status == "unavailable":
            continue
        assert row.status == "ok", (row.method, row.reason)
        assert row.agrees is True and row.rel_diff <= res.reference["tolerance_rel"]
        assert row.median_s is not None and len(row.times_s) == 1
    ref = res.reference
    assert len(ref["float32_loop_perturbed_rel_diffs"]) == runner.N_PERTURB
    assert ref["tolerance_rel"] == runner.tolerance(max([ref["float32_loop_rel_diff"],
                                                          *ref["float32_loop_perturbed_rel_diffs"]]))


def test_perturbed_inputs_move_by_about_one_ulp():
    cfg = Config("omniglot", 2, 1, 0.4, False)
    batch = configs.make_batch(cfg, 0)
    a, b = runner.perturb_inputs(batch, 0), runner.perturb_inputs(batch, 0)
    c = runner.perturb_inputs(batch, 1)
    for i in (0, 2):  # xs, xq: changed by ~2^-23 relative, reproducibly per seed
        rel = ((a[i] - batch[i]).abs() / batch[i].abs().clamp_min(1e-30)).max().item()
        assert 0 < rel < 2.0 ** -23 * 8
        assert torch.equal(a[i], b[i]) and not torch.equal(a[i], c[i])
    for i in (1, 3):  # labels untouched
        assert a[i] is batch[i]


def test_refuse_speedup_on_disagreement(monkeypatch):
    """A method whose meta-gradient is 1 % off is timed and reported, but gets no speedup;
    a method that agrees gets one; nothing gets a speedup over a fastmaml that disagrees."""
    cfg = Config("sinusoid", 3, 1, 0.01, False)
    real_make = peers.make

    def fake_make(method, p, backend="auto"):
        if method in ("fastmaml", "bogus"):
            model = configs.build_model(cfg.family).to(p.device)
            scale = 1.0 if method == "fastmaml" else 1.01
            return peers.Prepared(lambda i: [g * scale for g in peers.loop_meta_grad(model, p.batches[i], cfg)],
                                  list, lambda o: None)
        return real_make(method, p, backend)

    monkeypatch.setattr(peers, "make", fake_make)
    s = runner.Settings(device=torch.device("cpu"), warmup=1, reps=2, min_reps=2, memory=False, n_batches=2)
    res = harness.run_config(cfg, ["fastmaml", "loop", "bogus"], s)
    rows = {r.method: r for r in res.rows}
    assert rows["fastmaml"].agrees and rows["fastmaml"].speedup == pytest.approx(1.0)
    assert rows["loop"].agrees and rows["loop"].speedup is not None
    assert rows["loop"].speedup == pytest.approx(rows["loop"].median_s / rows["fastmaml"].median_s)
    bogus = rows["bogus"]
    assert bogus.status == "disagrees" and bogus.agrees is False
    assert bogus.median_s is not None, "a disagreeing method is still timed"
    assert bogus.speedup is None and "disagrees" in bogus.speedup_note
    assert bogus.rel_diff == pytest.approx(0.01, rel=1e-3)

    # fastmaml itself disagreeing: no speedup anywhere
    rows["fastmaml"].agrees = False
    runner.assign_speedups(res.rows)
    assert all(r.speedup is None for r in res.rows)


def test_slow_methods_get_one_warmup_and_at_least_one_rep(monkeypatch):
    """A method whose warm-up step exceeds budget / min_reps gets no further warm-up and
    min_reps = 1 (JAX or compiled conv nets on a CPU); a fast one keeps warmup/min_reps."""
    cfg = Config("sinusoid", 2, 1, 0.01, False)
    calls = {"slow": 0, "fast": 0}

    def fake_make(method, p, backend="auto"):
        model = configs.build_model(cfg.family).to(p.device)

        def step(i):
            calls[method] += 1
            if method == "slow":
                measure_sleep(0.25)
            return peers.loop_meta_grad(model, p.batches[i], cfg)

        return peers.Prepared(step, list, lambda o: None)

    import time as _time

    def measure_sleep(s):
        _time.sleep(s)

    monkeypatch.setattr(peers, "make", fake_make)
    s = runner.Settings(device=torch.device("cpu"), warmup=3, reps=4, min_reps=4, budget_s=0.4,
                         memory=True, check=False, n_batches=2)
    res = harness.run_config(cfg, ["slow", "fast"], s)
    rows = {r.method: r for r in res.rows}
    slow, fast = rows["slow"], rows["fast"]
    assert "slow_method" in slow.info and "slow_method" not in fast.info
    # slow: first call + 1 warm-up + timed reps until the 0.4 s budget (at least 1, < min_reps=4)
    assert 1 <= len(slow.times_s) < 4 and calls["slow"] == 2 + len(slow.times_s)
    # fast: first call + 3 warm-ups + at least min_reps timed reps
    assert len(fast.times_s) >= 4 and calls["fast"] == 4 + len(fast.times_s)

    # very slow (the warm-up call alone exceeds the whole budget): timed by that call
    calls.update(slow=0)
    s2 = runner.Settings(device=torch.device("cpu"), warmup=3, reps=4, min_reps=4, budget_s=0.2,
                          memory=True, check=False, n_batches=2)
    slow2 = harness.run_config(cfg, ["slow"], s2).rows[0]
    assert calls["slow"] == 2 and len(slow2.times_s) == 1 and slow2.times_s[0] >= 0.25
    assert "timed by its one warm-up call" in slow2.info["slow_method"] and slow2.median_s == slow2.times_s[0]


def test_unavailable_and_failing_methods_are_reported(monkeypatch):
    cfg = Config("sinusoid", 2, 1, 0.01, False)

    def fake_make(method, p, backend="auto"):
        if method == "missing":
            raise peers.Unavailable("not installed")

        def boom(i):
            raise RuntimeError("compile failed: no kernel")

        return peers.Prepared(boom, list, lambda o: None)

    monkeypatch.setattr(peers, "make", fake_make)
    s = runner.Settings(device=torch.device("cpu"), memory=False, n_batches=1)
    res = harness.run_config(cfg, ["missing", "broken"], s)
    r0, r1 = res.rows
    assert r0.status == "unavailable" and r0.reason == "not installed" and r0.median_s is None
    assert r1.status == "failed" and "compile failed" in r1.reason and r1.speedup is None
