"""The op micro-suites of ``python -m fastmaml.bench`` (``--suite sgd_step | batch_norm |
mlp_triton``), the shared timer (``measure.repeat``) and JSON writer (``report.write_payload``):
small shapes, every method's result checked, no timings asserted."""

from __future__ import annotations

import json

import pytest
import torch

from fastmaml.bench import measure, op_batch_norm, op_mlp_triton, op_sgd_step, report
from fastmaml.bench.__main__ import OP_SUITES, main, op_suite

CPU = torch.device("cpu")


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _flat(o)]


def test_repeat_times_every_call_after_the_warmup():
    calls = []
    ts = measure.repeat(lambda: calls.append(1), 4, 2, CPU)
    assert len(ts) == 4 and len(calls) == 6 and all(t >= 0 for t in ts)
    with pytest.raises(ValueError, match="reps must be >= 1, got 0"):
        measure.repeat(lambda: None, 0, 0, CPU)


def test_write_payload_writes_json_with_the_machine(tmp_path):
    path = tmp_path / "sub" / "x.json"
    report.write_payload(path, {"meta": report.machine_info(CPU), "rows": [{"a": 1.5}]})
    data = json.loads(path.read_text())
    assert data["rows"] == [{"a": 1.5}] and data["meta"]["cpu"] and data["meta"]["versions"]["torch"]


def test_machine_info_records_the_malloc_tuning(monkeypatch):
    """glibc's MALLOC_* settings change the timings of large-tensor methods (page faults), so
    the report names them next to the command."""
    import os

    for k in [k for k in os.environ if k.startswith("MALLOC_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "268435456")
    m = report.machine_info(CPU)
    assert m["malloc_env"] == {"MALLOC_MMAP_THRESHOLD_": "268435456"}
    doc = report.markdown_doc([], dict(m, wall_s=1.0, matmul={}, rounds=1), "python -m fastmaml.bench")
    assert "- command: `python -m fastmaml.bench` with MALLOC_MMAP_THRESHOLD_=268435456" in doc
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    doc = report.markdown_doc([], dict(report.machine_info(CPU), wall_s=1.0, matmul={}, rounds=1), "cmd")
    assert "- command: `cmd`\n" in doc


def test_op_suite_is_picked_from_the_suite_option():
    assert set(OP_SUITES) == {"sgd_step", "batch_norm", "mlp_triton"}
    assert op_suite(["--suite", "sgd_step", "--reps", "3"]) == ("sgd_step", ["--reps", "3"])
    assert op_suite(["--reps", "3", "--suite=batch_norm"]) == ("batch_norm", ["--reps", "3"])
    assert op_suite(["--suite", "sinusoid", "--reps", "3"]) == (None, ["--suite", "sinusoid", "--reps", "3"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sgd_step_suite_methods_agree(dtype):
    sets = {"tiny": ([(3, 2), (3,)], 2, 0.1)}
    r = op_sgd_step.bench_set("tiny", "cpu", dtype, CPU, reps=5, warmup=0, sets=sets)
    assert r["elements_per_task"] == 9 and r["tasks"] == 2
    assert r["max_abs_diff_vs_reference"] <= (1e-6 if dtype == torch.float32 else 1e-14)
    assert set(r["methods"]) == {"fastmaml[cpu]", "fastmaml[cpu] out=", "reference loop", "torch._foreach",
                                 op_sgd_step.COPY}
    es = torch.empty((), dtype=dtype).element_size()
    for m in r["methods"].values():
        assert m["reps"] == 5 and m["bytes"] == (9 + 2 * 2 * 9) * es and m["median_s"] > 0
    tg, lines = op_sgd_step.targets([dict(r, set="sinusoid")])
    assert set(tg) == {"sinusoid_fused_3x_faster_than_reference"} and len(lines) == 1


def test_sgd_step_suite_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "sgd.json"
    assert main(["--suite", "sgd_step", "--sets", "sinusoid", "--reps", "5", "--warmup", "0", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["benchmark"] == "sgd_step" and data["meta"]["cpu"] and data["results"][0]["set"] == "sinusoid"
    assert data["results"][0]["max_abs_diff_vs_reference"] <= 1e-6
    assert "targets:" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--suite", "sgd_step", "--sets", "nope"])


def test_batch_norm_suite_fused_matches_pytorch():
    if not op_batch_norm.bn.available():
        pytest.skip("fastmaml._C is not built")
    shape = (3, 2, 2, 2)
    native = op_batch_norm.stage_calls(op_batch_norm._native, shape, torch.float64)
    fused = op_batch_norm.stage_calls(op_batch_norm._fused, shape, torch.float64)
    for stage in op_batch_norm.STAGES:
        for a, b in zip(_flat(native[stage]()), _flat(fused[stage]()), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    rows = op_batch_norm.run([("tiny", shape)], torch.float64, reps=2)
    assert [r["stage"] for r in rows] == list(op_batch_norm.STAGES)
    assert all(r["pytorch_ms"] > 0 and r["fastmaml_ms"] > 0 for r in rows)


def test_batch_norm_suite_cli(tmp_path, capsys, monkeypatch):
    if not op_batch_norm.bn.available():
        pytest.skip("fastmaml._C is not built")
    monkeypatch.setattr(op_batch_norm, "SHAPES", [("tiny 2 x 3 x 2 x 2", (2, 3, 2, 2))])
    out = tmp_path / "bn.json"
    assert main(["--suite", "batch_norm", "--reps", "2", "--dtype", "float64", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("| tiny 2 x 3 x 2 x 2 |") == 3
    data = json.loads(out.read_text())
    assert data["benchmark"] == "batch_norm" and len(data["rows"]) == 3 and data["meta"]["cpu"]


def test_mlp_triton_flop_count():
    # dims 1-40-40-1, N = 10, T = 25: products 2·T·N·(40, 1600, 40)
    p = [2 * 25 * 10 * n for n in (40, 1600, 40)]
    assert op_mlp_triton.flops([1, 40, 40, 1], 10, 25) == (2 * p[0] + 3 * p[1] + 3 * p[2],
                                                          3 * p[0] + 8 * p[1] + 8 * p[2])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_mlp_triton_suite_needs_a_gpu(capsys):
    assert main(["--suite", "mlp_triton", "--reps", "1"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.triton
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_mlp_triton_suite_cases_agree(loss, triton_device):
    from fastmaml.triton import mlp as tmlp

    cs = op_mlp_triton.cases(tmlp, [3, 4, 2], 3, 2, loss, torch.device(triton_device), torch.float32)
    assert set(cs) == {"grad triton", "grad reference", "hvp triton", "hvp reference"}
    for what in ("grad", "hvp"):
        (ft, fl_t), (fr, fl_r) = cs[f"{what} triton"], cs[f"{what} reference"]
        assert fl_t == fl_r > 0
        for a, b in zip(_flat(ft()), _flat(fr()), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
