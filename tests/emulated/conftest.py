"""The emulated CUDA build's tests (``FASTMAML_CUDA=emulate``, see csrc/common/cuda_emulation.h).

Every test here carries the ``emulated`` marker and is skipped, with the reason, when
``fastmaml._C`` is not the emulated build; except test_gpu_semantics.py, marked ``cuda``
(a GPU, or the GPU dry run of gpu_dry_run.py). The kernel coverage test runs last: it reads
the per-kernel launch counters the other tests left. At the end of the session the
coverage list (every ``__global__`` kernel of csrc/ with its emulated launches and what
the race check saw) is printed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from fastmaml import _ext

HERE = Path(__file__).resolve().parent
CSRC = HERE.parents[1] / "csrc"
EMULATED = _ext.cuda_emulated()
SKIP_REASON = "needs the emulated CUDA build (FASTMAML_CUDA=emulate python setup.py build_ext --inplace)"


def global_kernels() -> list[str]:
    """Names of every ``__global__`` function defined in csrc/**/*.cu and *.cuh."""
    names = set()
    pat = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(")
    for path in [*CSRC.rglob("*.cu"), *CSRC.rglob("*.cuh")]:
        names.update(pat.findall(path.read_text()))
    return sorted(names)


def pytest_configure(config):
    # CI (.ci/stage_cuda_emulated.sh) sets this: a wrong build must fail, not skip
    if os.environ.get("FASTMAML_REQUIRE_EMULATED") == "1" and not EMULATED:
        raise pytest.UsageError(f"FASTMAML_REQUIRE_EMULATED=1 but fastmaml._C is not the emulated build "
                                f"({_ext.IMPORT_ERROR or 'cuda_emulated is False'})")


def pytest_collection_modifyitems(config, items):
    mine = [it for it in items if HERE in Path(str(it.fspath)).resolve().parents]
    global _COLLECTED
    _COLLECTED = any("cuda" not in it.keywords for it in mine)
    for it in mine:
        if "cuda" in it.keywords:  # CUDA-tensor tests: a GPU, or the GPU dry run (root conftest skips them)
            continue
        if not getattr(getattr(it, "module", None), "NEEDS_EMULATION", True):
            continue  # Triton launch checks: any build
        it.add_marker(pytest.mark.emulated)
        if not EMULATED:
            it.add_marker(pytest.mark.skip(reason=SKIP_REASON))
    # the coverage test reads what the others launched: move it to the end
    last = [it for it in mine if it.name.startswith("test_every_kernel_")]
    for it in last:
        items.remove(it)
    items.extend(last)


def coverage_lines() -> list[str]:
    stats = _ext.ext().cuda_emulation_stats()
    lines = ["emulated CUDA kernel coverage (launches, blocks, barriers, warp ops, shared/global accesses "
             "checked by the race check, races, failed launches):"]
    for name in global_kernels():
        s = stats.get(name, {})
        lines.append(f"  {name:<36} launches {s.get('launches', 0):>6}  blocks {s.get('blocks', 0):>7}  "
                     f"barriers {s.get('barriers', 0):>8}  warp {s.get('warp_ops', 0):>5}  "
                     f"shared {s.get('shared_accesses', 0):>10}  global {s.get('global_accesses', 0):>10}  "
                     f"races {s.get('races', 0):>4}  failed {s.get('failed', 0):>3}  "
                     f"variants {len(s.get('variants', {}))}")
    return lines


_COLLECTED = False  # whether this session runs emulated tests (not only the cuda-marked ones)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if EMULATED and _COLLECTED and _ext._C is not None and not config.pluginmanager.has_plugin("gpu_dry_run"):
        for line in coverage_lines():
            terminalreporter.write_line(line)
