"""benchmarks/gpu_check.sh keeps to its time budget (540 s by default; a GPU run must fit in
one 600 s lease) and says what it skipped: run with stub commands (``python``,
``nvidia-smi``) that only sleep, so the stage logic is what is tested, not the GPU."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

# (runs in the emulated CI stage with the other tests of this folder: ~40 s of stub stages)
SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.sh"


def _stub(path: Path, body: str) -> None:
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def run_check(tmp_path: Path, budget: int, sleep_s: float, versions_sleep_s: float | None = None):
    repo = tmp_path / "repo"
    (repo / "benchmarks").mkdir(parents=True)
    shutil.copy(SCRIPT, repo / "benchmarks" / "gpu_check.sh")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir / "nvidia-smi", 'echo "9.0"\n')
    versions = versions_sleep_s if versions_sleep_s is not None else sleep_s
    _stub(bin_dir / "python", f"""case "$*" in
  *--collect-only*) echo "tests/test_x.py::test_a"; echo "tests/test_x.py::test_b";;
  -) sleep {versions};;
  *) sleep {sleep_s};;
esac
exit 0
""")
    out = tmp_path / "out"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FASTMAML_CHECK_BUDGET=str(budget),
               FASTMAML_CHECK_OUT=str(out), TRITON_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("FASTMAML_CUDA_ARCH", None)
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(repo / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=budget + 60)
    return proc, (out / "summary.txt").read_text(), time.monotonic() - t0


def test_default_budget_is_540_seconds():
    text = SCRIPT.read_text()
    assert 'budget="${FASTMAML_CHECK_BUDGET:-540}"' in text


def test_stages_fit_the_budget_and_skipped_ones_are_reported(tmp_path):
    proc, summary, wall = run_check(tmp_path, budget=85, sleep_s=3)
    assert proc.returncode == 0, proc.stdout[-2000:]
    for stage in ("smi", "versions", "build", "info", "tests-cuda", "tests-triton", "bench-sgd-step"):
        assert f"ok      {stage} " in summary, summary
    assert "SKIPPED bench-quick" in summary, summary  # needs 60 s, which are not left
    total = int(summary.split("total")[1].split("s of")[0])
    assert total <= 85 and wall <= 85 + 5, (total, wall)


def test_a_hanging_stage_is_cut_at_the_budget(tmp_path):
    budget = 25  # the versions stage (its own limit 30 s) gets the 15 s left, then the build cannot start
    proc, summary, wall = run_check(tmp_path, budget=budget, sleep_s=1, versions_sleep_s=1000)
    assert proc.returncode != 0
    assert "FAILED  versions" in summary and "timed out" in summary, summary
    assert "SKIPPED build" in summary and "FAILED  build (not run" in summary, summary
    assert wall <= budget + 5, wall
