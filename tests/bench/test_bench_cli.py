"""``python -m fastmaml.bench``: a tiny run writes the table, JSON, Markdown and plot; the
``--method-timeout`` option. No timings are asserted."""

from __future__ import annotations

import json

import pytest
import torch


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


def test_cli_load_rounds_and_machine_rate(tmp_path, capsys):
    """A tiny run with --load and 2 interleaved rounds: the competitor ran and is gone, the
    header gives the sgemm rates and the load, every row its fraction of the sgemm rate."""
    import os

    from fastmaml.bench.__main__ import run

    argv = ["--suite", "sinusoid", "--tasks", "2", "--steps", "1", "--order", "first", "--peers", "fastmaml,loop",
            "--reps", "2", "--calls", "2", "--load", "--load-settle", "0", "--out", str(tmp_path), "--no-progress",
            "--device", "cpu"]
    results, meta, paths = run(argv)
    printed = capsys.readouterr().out
    assert "load: ON, a competitor process" in printed and "[--load:" in printed
    assert "float32 sgemm 1024x1024" in printed and "MEDIAN OF THE PER-ROUND RATIOS" in printed
    lo = meta["load"]
    assert lo["on"] is True and lo["cpu_s"] > 0
    with pytest.raises(ProcessLookupError):
        os.kill(lo["pid"], 0)
    assert set(meta["matmul"]) == {"at the start", "under --load", "at the end"} and meta["rounds"] == 2
    data = json.loads(paths["json"].read_text())
    assert data["meta"]["load"]["on"] is True
    for r in data["results"]:
        assert r["load"] is True and r["rounds"] == 2 and r["sgemm_gflops"] > 0
        loop = next(row for row in r["rows"] if row["method"] == "loop")
        assert len(loop["round_medians_s"]) == 2 and len(loop["times_s"]) == 4
        assert loop["sgemm_fraction"] == pytest.approx(loop["gflops"] / r["sgemm_gflops"])
    md = paths["md"].read_text()
    assert "- load: ON" in md and "GFLOP/s (% sgemm)" in md


def test_cli_reps_and_calls_options():
    from fastmaml.bench.__main__ import parse_args, run

    a = parse_args(["--full", "--reps", "3", "--calls", "7", "--load"])
    assert a.reps == 3 and a.calls == 7 and a.load is True and a.quick is False
    b = parse_args([])
    assert b.reps is None and b.calls is None and b.load is False
    with pytest.raises(SystemExit, match=r"--reps must be >= 1, got 0"):
        run(["--suite", "sinusoid", "--reps", "0", "--no-progress", "--device", "cpu"])
