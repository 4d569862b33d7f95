"""The benchmark harness: its peers compute the MAML meta-gradient (checked against the
float64 unrolled-autograd reference before anything is timed), its agreement rule refuses
speedups for disagreeing methods, and a tiny run writes the table, JSON, Markdown and plot.
No timings are asserted."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os

import pytest
import torch

from fastmaml.bench import configs, harness, measure, peers
from fastmaml.bench.configs import Config


def _problem(cfg: Config, dtype=torch.float32, n_batches: int = 2) -> peers.Problem:
    model = configs.build_model(cfg.family, cfg.seed).to(dtype)
    batches = [configs.make_batch(cfg, i, "cpu", dtype) for i in range(n_batches)]
    return peers.Problem(cfg, model, batches, torch.device("cpu"))


def _unrolled_meta_grad(model: torch.nn.Module, batch, cfg: Config) -> list[torch.Tensor]:
    """Independent ground truth: all tasks at once, parameters expanded per task, the K
    steps unrolled with create_graph=True, one backward of the mean query loss."""
    loss_fn = torch.nn.functional.mse_loss if cfg.fam.loss == "mse" else torch.nn.functional.cross_entropy
    names = [n for n, _ in model.named_parameters()]
    theta = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    xs, ys, xq, yq = batch
    total = 0.0
    for t in range(xs.shape[0]):
        fast = theta
        for _ in range(cfg.K):
            ls = loss_fn(torch.func.functional_call(model, dict(zip(names, fast)), (xs[t],)), ys[t])
            g = torch.autograd.grad(ls, fast, create_graph=not cfg.first_order)
            if cfg.first_order:
                g = [x.detach() for x in g]
            fast = [w - cfg.inner_lr * x for w, x in zip(fast, g)]
        total = total + loss_fn(torch.func.functional_call(model, dict(zip(names, fast)), (xq[t],)), yq[t])
    return list(torch.autograd.grad(total / xs.shape[0], theta))


def _worst(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b))


TINY_MLP = [Config("sinusoid", 3, 2, 0.01, fo) for fo in (False, True)]


@pytest.fixture(autouse=True)
def _one_thread():
    # The peers are tiny here; one thread avoids OpenMP spin-waiting on a shared machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("cfg", TINY_MLP + [Config("wide_mlp", 2, 1, 0.4, False)], ids=lambda c: c.name)
def test_reference_is_unrolled_autograd(cfg):
    prob = _problem(cfg, torch.float64)
    ref = peers.reference_meta_grad(prob, 0)
    truth = _unrolled_meta_grad(prob.model, prob.batches[0], cfg)
    assert _worst(ref, truth) < 1e-12, f"reference off by {_worst(ref, truth):.3g}"
    # second order differs from first order: the check would notice a wrong order
    other = _unrolled_meta_grad(prob.model, prob.batches[0], cfg.with_(first_order=not cfg.first_order))
    assert _worst(ref, other) > 1e-6


@pytest.mark.parametrize("method", ["loop", "higher", "vmap"])
@pytest.mark.parametrize("cfg", TINY_MLP, ids=lambda c: c.name)
def test_torch_peers_match_reference_float64(cfg, method):
    """Run in float64, each torch peer computes the reference meta-gradient to rounding."""
    if method == "higher":
        pytest.importorskip("higher")
    prob = _problem(cfg, torch.float64)
    ref = peers.reference_meta_grad(prob, 0)
    prep = peers.make(method, prob)
    for i in range(2):  # and on a second, rotated batch: no state leaks between steps
        got = prep.to_torch(prep.step(i))
        want = peers.reference_meta_grad(prob, i)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.shape == w.shape
        err = _worst(got, want)
        assert err < 1e-10, f"{method} off by {err:.3g} on batch {i}"
    assert _worst(ref, peers.reference_meta_grad(prob, 0)) == 0.0


@pytest.mark.parametrize("cfg", [Config("sinusoid", 4, 2, 0.01, False), Config("sinusoid", 4, 2, 0.01, True),
                                 Config("omniglot", 1, 1, 0.4, False)], ids=lambda c: c.name)
def test_harness_checks_peers_in_float32(cfg):
    """In float32 the harness's agreement rule accepts the peers that compute MAML."""
    s = harness.Settings(device=torch.device("cpu"), warmup=1, reps=1, min_reps=1, memory=False, n_batches=2)
    methods = ["loop", "higher"] + (["vmap"] if cfg.fam.mlp_widths else [])
    res = harness.run_config(cfg, methods, s)
    for row in res.rows:
        if row.status == "unavailable":
            continue
        assert row.status == "ok", (row.method, row.reason)
        assert row.agrees is True and row.rel_diff <= res.reference["tolerance_rel"]
        assert row.median_s is not None and len(row.times_s) == 1
    ref = res.reference
    assert len(ref["float32_loop_perturbed_rel_diffs"]) == harness.N_PERTURB
    assert ref["tolerance_rel"] == harness.tolerance(max([ref["float32_loop_rel_diff"],
                                                          *ref["float32_loop_perturbed_rel_diffs"]]))


def test_perturbed_inputs_move_by_about_one_ulp():
    cfg = Config("omniglot", 2, 1, 0.4, False)
    batch = configs.make_batch(cfg, 0)
    a, b = harness.perturb_inputs(batch, 0), harness.perturb_inputs(batch, 0)
    c = harness.perturb_inputs(batch, 1)
    for i in (0, 2):  # xs, xq: changed by ~2^-23 relative, reproducibly per seed
        rel = ((a[i] - batch[i]).abs() / batch[i].abs().clamp_min(1e-30)).max().item()
        assert 0 < rel < 2.0 ** -23 * 8
        assert torch.equal(a[i], b[i]) and not torch.equal(a[i], c[i])
    for i in (1, 3):  # labels untouched
        assert a[i] is batch[i]


def test_jax_peer_matches_reference():
    pytest.importorskip("jax")
    cfg = Config("sinusoid", 2, 1, 0.01, False)
    prob = _problem(cfg)
    ref = peers.reference_meta_grad(prob, 0)
    prep = peers.make("jax", prob)
    out = prep.step(0)
    prep.sync(out)
    abs_d, rel_d = harness.compare(prep.to_torch(out), ref)
    assert rel_d < 1e-5, f"jax off by {rel_d:.3g} relative"


@pytest.mark.parametrize("family", ["omniglot", "miniimagenet", "wide_mlp"])
def test_jax_network_translation(family):
    """The JAX peer's network is the PyTorch network: same output on the same weights."""
    jax = pytest.importorskip("jax")
    import numpy as np

    torch.manual_seed(0)
    model = configs.build_model(family)
    x = torch.randn(3, *configs.FAMILIES[family].input_shape)
    fwd = jax.jit(peers.jax_forward(peers._jax_layers(model)))
    got = np.asarray(fwd([p.detach().numpy() for p in model.parameters()], x.numpy()))
    want = model(x).detach().numpy()
    assert np.abs(got - want).max() < 1e-4 * max(1.0, np.abs(want).max())


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
    s = harness.Settings(device=torch.device("cpu"), warmup=1, reps=2, min_reps=2, memory=False, n_batches=2)
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
    harness.assign_speedups(res.rows)
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
    s = harness.Settings(device=torch.device("cpu"), warmup=3, reps=4, min_reps=4, budget_s=0.4,
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
    s2 = harness.Settings(device=torch.device("cpu"), warmup=3, reps=4, min_reps=4, budget_s=0.2,
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
    s = harness.Settings(device=torch.device("cpu"), memory=False, n_batches=1)
    res = harness.run_config(cfg, ["missing", "broken"], s)
    r0, r1 = res.rows
    assert r0.status == "unavailable" and r0.reason == "not installed" and r0.median_s is None
    assert r1.status == "failed" and "compile failed" in r1.reason and r1.speedup is None


def test_fastmaml_rows_are_never_faked():
    """Without fastmaml.MAML the fastmaml rows say so; with it, they run it."""
    import fastmaml

    prob = _problem(Config("sinusoid", 2, 1, 0.01, False))
    if getattr(fastmaml, "MAML", None) is None:
        with pytest.raises(peers.Unavailable, match="not available"):
            peers.make("fastmaml", prob)
    else:
        prep = peers.make("fastmaml", prob)
        got = prep.to_torch(prep.step(0))
        _, rel = harness.compare(got, peers.reference_meta_grad(prob, 0))
        assert rel < 1e-4
        assert prep.info()["path"]


def test_flop_count():
    # sinusoid, P = 1·40 + 40·40 + 40·1 = 1680 weights; per task 6·P·(K·Ns + Nq) + 12·K·Ns·P
    assert configs.mlp_meta_step_flops((1, 40, 40, 1), 25, 5, 10, 10, False) == 25 * (6 * 1680 * 60 + 12 * 50 * 1680)
    assert configs.mlp_meta_step_flops((1, 40, 40, 1), 25, 5, 10, 10, True) == 25 * 6 * 1680 * 60
    assert configs.config_flops(Config("omniglot", 2, 1, 0.4)) is None


def test_batches_have_the_real_shapes():
    b = configs.make_batch(Config("miniimagenet", 2, 5, 0.01), 0)
    assert [tuple(t.shape) for t in b] == [(2, 25, 3, 84, 84), (2, 25), (2, 75, 3, 84, 84), (2, 75)]
    assert b[1].dtype == torch.int64 and set(b[1][0].tolist()) == set(range(5))
    b = configs.make_batch(Config("sinusoid", 4, 5, 0.01), 0)
    assert [tuple(t.shape) for t in b] == [(4, 10, 1)] * 4
    b2 = configs.make_batch(Config("sinusoid", 4, 5, 0.01), 1)
    assert not torch.equal(b[0], b2[0]), "rotated batches must differ"


def test_cpu_peak_memory_sees_an_allocation():
    ok, why = measure.cpu_peak_supported()
    if not ok:
        pytest.skip(why)
    n = 64 * 2**20 // 4
    peak, kind, _ = measure.peak_growth(lambda: torch.ones(n).sum(), lambda o: None, torch.device("cpu"), "torch")
    assert kind == "RSS high-water growth"
    assert 60 * 2**20 <= peak < 512 * 2**20


def test_cli_writes_table_json_markdown_and_plot(tmp_path, capsys):
    from fastmaml.bench.__main__ import run, update_results_md

    results_md = tmp_path / "RESULTS.md"
    results_md.write_text("# results\n\n<!-- fastmaml-bench:placeholder -->\nNo figures yet.\n"
                          "<!-- /fastmaml-bench:placeholder -->\n")
    argv = ["--suite", "sinusoid,scaling-T", "--tasks", "2", "--steps", "1", "--order", "second",
            "--peers", "fastmaml,loop,vmap", "--reps", "2", "--out", str(tmp_path / "out"),
            "--results-md", str(results_md), "--no-progress", "--device", "cpu"]
    results, meta, paths = run(argv)
    printed = capsys.readouterr().out
    assert "sinusoid T=2 K=1 second-order" in printed and "median/step" in printed
    assert "wall time" in printed and str(paths["json"]) in printed
    data = json.loads(paths["json"].read_text())
    assert data["meta"]["versions"]["torch"] == torch.__version__
    assert data["meta"]["cpu"] and "commit" in data["meta"]["git"] and data["meta"]["command"].endswith("cpu")
    assert data["meta"]["method_timeout_s"] is None  # quick mode: every method in this process
    suites = {r["suite"] for r in data["results"]}
    assert suites == {"sinusoid", "scaling-T"}
    for r in data["results"]:
        rows = {row["method"]: row for row in r["rows"]}
        assert rows["loop"]["agrees"] is True and rows["loop"]["median_s"] > 0
        assert rows["loop"]["gflops"] > 0 and r["flops_per_meta_step"] > 0
        assert rows["fastmaml"]["status"] in ("ok", "unavailable")
    md = results_md.read_text()
    assert "<!-- fastmaml-bench:cpu -->" in md and "| loop |" in md and meta["command"] in md
    assert md.startswith("# results") and "No figures yet" not in md
    # a second run replaces its device's section; another device kind gets its own section
    update_results_md(results_md, "cpu", "### second cpu run")
    update_results_md(results_md, "gpu", "### gpu run")
    md2 = results_md.read_text()
    assert md2.count("<!-- fastmaml-bench:cpu -->") == 1 and "### second cpu run" in md2
    assert "| loop |" not in md2 and "### gpu run" in md2
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "png" not in paths
    else:
        assert paths["png"].stat().st_size > 10_000


# ---------------------------------------------------------------------------------
# --method-timeout: each method in a spawned child process (~2-3 s per child here)
# ---------------------------------------------------------------------------------

ISO_CFG = Config("sinusoid", 3, 2, 0.01, False)


def _iso_settings(cap):
    return harness.Settings(device=torch.device("cpu"), warmup=1, reps=2, min_reps=2, n_batches=2,
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
    a, b = harness.make_problem(ISO_CFG, s), harness.make_problem(ISO_CFG, s)
    for x, y in zip([*a.model.state_dict().values(), *(t for bt in a.batches for t in bt)],
                    [*b.model.state_dict().values(), *(t for bt in b.batches for t in bt)]):
        assert x.dtype == y.dtype and torch.equal(x, y)
    digest = harness.problem_digest(a)
    # the digest sees one ulp in one batch entry, and another seed
    b.batches[1][0].view(-1)[0] = torch.nextafter(b.batches[1][0].view(-1)[0], torch.tensor(float("inf")))
    assert harness.problem_digest(b) != digest
    assert harness.problem_digest(harness.make_problem(ISO_CFG.with_(seed=1), s)) != digest
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
    assert "SIGKILL" in harness._exit_reason(-9) and "OOM" in harness._exit_reason(-9)
    assert "exited with code 1" in harness._exit_reason(1)
    # a child whose rebuilt problem differs from the parent's is not measured
    row = harness.run_isolated(ISO_CFG, "loop", _iso_settings(60.0), None, None, digest="not-the-digest")
    assert row.status == "failed" and "differs from the parent's" in row.reason and row.median_s is None
    with pytest.raises(ProcessLookupError):
        os.kill(row.info["pid"], 0)


def test_cli_method_timeout_option():
    from fastmaml.bench.__main__ import method_timeout, parse_args

    assert method_timeout(parse_args([])) is None  # quick mode: in-process
    assert method_timeout(parse_args(["--full"])) == 600.0
    assert method_timeout(parse_args(["--full", "--method-timeout", "0"])) is None
    assert method_timeout(parse_args(["--method-timeout", "0"])) is None
    assert method_timeout(parse_args(["--method-timeout", "12.5"])) == 12.5
    assert method_timeout(parse_args(["--full", "--method-timeout", "30"])) == 30.0
    with pytest.raises(SystemExit):
        method_timeout(parse_args(["--method-timeout", "-1"]))
