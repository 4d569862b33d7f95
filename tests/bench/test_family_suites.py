"""The ``imaml`` and ``reptile`` suites of ``python -m fastmaml.bench`` at a tiny size
(the sinusoid MLP, T=2, K=1), rows through the report writer (terminal table, JSON,
Markdown). The points run in this process here (a child costs ~3 s of imports each);
``test_point_in_a_fresh_process`` runs one through the child route the suites use. No
timings are asserted beyond > 0."""

from __future__ import annotations

import json

import pytest

from fastmaml.bench import family, suites


def test_imaml_and_reptile_suites_write_rows(tmp_path, capsys, monkeypatch):
    from fastmaml.bench.__main__ import run

    monkeypatch.setattr(family, "BENCH_FAMILIES", ("sinusoid",))
    monkeypatch.setitem(family.BENCH_CG, True, (5,))
    ran = []

    def in_process(spec: dict, timeout_s: float) -> dict:
        ran.append((spec["algo"], spec["cg"], timeout_s))
        return family.run_point(spec)

    monkeypatch.setattr(family, "run_isolated", in_process)
    argv = ["--suite", "imaml,reptile", "--steps", "1", "--tasks", "2", "--reps", "1", "--out", str(tmp_path),
            "--no-progress", "--device", "cpu"]
    results, meta, paths = run(argv)
    printed = capsys.readouterr().out
    assert sorted(ran) == [("imaml", 5, 900.0), ("maml", 0, 900.0), ("reptile", 0, 900.0),
                           ("reptile-loop", 0, 900.0)]  # the K=1, CG 5 point once for both tables
    assert "against K: sinusoid T=2" in printed and "against CG steps" in printed and "Reptile: sinusoid" in printed
    data = json.loads(paths["json"].read_text())
    assert {r["suite"] for r in data["results"]} == {"imaml", "reptile"}
    rows = {(r["config"]["name"].split(":")[0], row["method"]): row for r in data["results"] for row in r["rows"]}
    want = {"imaml K=1", "maml K=1", "imaml cg=5", "fastmaml", "loop"}
    assert {m for _, m in rows} == want
    for (_, m), row in rows.items():
        assert row["status"] == "ok", (m, row["reason"])
        assert row["median_s"] > 0 and row["first_s"] > 0 and row["tasks_per_s"] > 0, m
        assert row["peak_bytes"] is not None and row["peak_bytes"] >= 0, m
        assert row["memory_kind"] == "RSS high-water growth", m
    cg = rows[("iMAML (λ=2) against CG steps", "imaml cg=5")]
    assert 1 <= cg["info"]["cg_iterations"] <= 5 and cg["info"]["path"] == "fused_mlp_hvp"
    assert cg["median_s"] == rows[("iMAML (λ=2, CG 5) vs MAML (second order) against K", "imaml K=1")]["median_s"]
    rep = rows[("Reptile", "fastmaml")]
    assert rep["agrees"] is True and rep["rel_diff"] < 1e-4 and rep["speedup"] == pytest.approx(1.0)
    assert rows[("Reptile", "loop")]["agrees"] is True and rows[("Reptile", "loop")]["speedup"] > 0
    md = paths["md"].read_text()
    assert "| imaml cg=5 |" in md and "| loop |" in md


def test_point_in_a_fresh_process():
    """One point through ``run_isolated`` (``python -m fastmaml.bench.family --point``):
    Omniglot's conv net at T=1, K=1 allocates megabytes of activations per meta-step."""
    spec = dict(suite="imaml-vs-maml", algo="maml", family="omniglot", T=1, K=1, cg=0, reps=1, device="cpu",
                threads=1)  # one torch thread in the child (a shared machine; see conftest.py)
    r = family.run_isolated(spec, timeout_s=120)
    assert "error" not in r, r.get("error")
    assert r["median_s"] > 0 and r["first_s"] > 0 and r["peak_bytes"] > 2**20 and r["path"] == "generic"
    row = family._row("maml K=1", "fastmaml.MAML", r)
    assert row.status == "ok" and row.tasks_per_s == pytest.approx(1 / r["median_s"])
    assert family._row("x", "x", dict(error="timed out after 5 s")).status == "timed out"


def test_family_suite_plans():
    assert all(p["threads"] == 1 for p in family.bench_points("reptile", True, "cpu"))  # conftest: 1 thread
    assert set(family.BENCH_SUITES) <= set(suites.SUITES)
    assert not set(family.BENCH_SUITES) & set(suites.QUICK_DEFAULT)  # a couple of minutes each: asked for
    quick = family.bench_points("imaml", True, "cpu")
    assert {(p["family"], p["algo"], p["K"], p["cg"]) for p in quick} == {
        ("miniimagenet", "imaml", 1, 5), ("miniimagenet", "maml", 1, 0), ("miniimagenet", "imaml", 5, 5),
        ("miniimagenet", "maml", 5, 0), ("miniimagenet", "imaml", 5, 1)}
    assert family.n_runs("imaml", True, "cpu") == 5  # the K=5, CG 5 point runs once for both tables
    full = family.bench_points("imaml", False, "cpu")
    assert {p["K"] for p in full if p["suite"] == "imaml-vs-maml"} == {1, 5, 10, 20}
    assert sorted(p["cg"] for p in full if p["suite"] == "imaml-cg" and p["family"] == "omniglot") == [1, 2, 5, 10, 20]
    assert {p["family"] for p in full} == {"omniglot", "miniimagenet"} and all(p["reps"] == 3 for p in full)
    rep = family.bench_points("reptile", False, "cpu", tasks=(3,))
    assert [(p["family"], p["algo"], p["T"]) for p in rep] == [
        (f, a, 3) for f in ("sinusoid", "omniglot", "miniimagenet") for a in ("reptile", "reptile-loop")]
    with pytest.raises(ValueError, match="name must be one of"):
        family.bench_points("protomaml", True, "cpu")
