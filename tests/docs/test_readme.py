"""The README's code and the example run as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_readme_python_blocks_run():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README.md has no python example"
    for code in blocks:
        ns: dict = {}
        exec(compile(code, "README.md", "exec"), ns)  # noqa: S102 - our own documentation
        if "maml" in ns:
            assert ns["maml"].path == "fused_mlp", ns["maml"].path_reason
            assert ns["pred"].shape == (25, 10, 1)


def test_sinusoid_example_runs_end_to_end(tmp_path):
    plot = tmp_path / "sinusoid.png"
    out = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "examples" / "sinusoid.py"), "--iterations", "30", "--eval-tasks", "20",
         "--plot", str(plot)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        # the example imports this checkout's fastmaml, installed or built in place
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "fastmaml path: fused_mlp" in out.stdout, out.stdout[-2000:]
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith(("MAML", "pretrained"))]
    assert len(rows) == 4 and {r[1] for r in rows} == {"5", "10"}, out.stdout[-2000:]
    assert plot.exists() and plot.stat().st_size > 0
