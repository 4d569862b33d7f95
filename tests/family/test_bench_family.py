"""fastmaml.bench.family: one point per algorithm in this process, the table and the
memory-growth summary."""

from __future__ import annotations

from fastmaml.bench import family


def test_points_table_and_memory_summary():
    res = []
    for algo in ("reptile", "reptile-loop", "imaml", "maml"):
        spec = dict(suite="imaml-vs-maml" if algo in ("imaml", "maml") else "reptile", algo=algo, family="sinusoid",
                    T=4, K=2, cg=3, reps=1, device="cpu")
        r = family.run_point(spec)
        assert r["median_s"] > 0 and len(r["times_s"]) == 1
        res.append(r)
    assert res[0]["path"] == "fused_mlp" and res[2]["path"] == "fused_mlp_hvp" and res[2]["cg_iterations"] == 3
    text = family.table(res)
    assert text.count("\n") == 2 + len(res) and "reptile-loop" in text
    fake = [dict(algo="imaml", suite="imaml-vs-maml", family="miniimagenet", K=k, peak_bytes=b)
            for k, b in ((1, 10**9), (5, 500_000_000), (20, 530_000_000))]
    assert "+2.00 MB per extra inner step" in family.memory_growth_per_step(fake)
    pts = family.plan(["imaml-vs-maml", "imaml-cg", "reptile"], ["miniimagenet"], [5, 20], [4, 8], 5, 1, "cpu")
    assert [(p["algo"], p["K"], p["cg"]) for p in pts[:4]] == [("imaml", 5, 4), ("maml", 5, 0), ("imaml", 20, 4),
                                                               ("maml", 20, 0)]
    assert len(pts) == 4 + 2 + 4
