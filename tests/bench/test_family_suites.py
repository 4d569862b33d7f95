"""The ``imaml`` and ``reptile`` suites of ``python -m fastmaml.bench`` at a tiny size
(the sinusoid MLP, T=2, K=1): every point in its own child process, rows through the
report writer (terminal table, JSON, Markdown). No timings are asserted beyond > 0."""

from __future__ import annotations

import json

import pytest

from fastmaml.bench import family, suites


def test_imaml_and_reptile_suites_write_rows(tmp_path, capsys, monkeypatch):
    from fastmaml.bench.__main__ import run

    monkeypatch.setattr(family, "BENCH_FAMILIES", ("sinusoid",))
    monkeypatch.setitem(family.BENCH_CG, True, (5,))  # four child processes in all (~3 s each)
    argv = ["--suite", "imaml,reptile", "--steps", "1", "--tasks", "2", "--reps", "1", "--out", str(tmp_path),
            "--no-progress", "--device", "cpu"]
    results, meta, paths = run(argv)
    printed = capsys.readouterr().out
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


def test_family_suite_plans():
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
