"""The coverage list: every ``__global__`` kernel of csrc/ ran through the emulated build
in this session, and the race check (on for every emulated launch) found nothing in the
package's kernels. Runs after the other emulated tests (conftest.py moves it last) and
reads the launch counters they left, so it fails when run without them."""

from __future__ import annotations

from conftest import coverage_lines, global_kernels

from fastmaml import _ext


def test_every_kernel_launched_and_race_free():
    stats = _ext.ext().cuda_emulation_stats()
    kernels = global_kernels()
    print("\n" + "\n".join(coverage_lines()))
    package = [k for k in kernels if not k.startswith("selftest_")]
    assert {"multi_tensor_kernel", "sum_segments_kernel", "loss_and_grad_kernel", "hvp_kernel", "maml_kernel",
            "reduce_tasks_kernel"} <= set(package), package
    missing = [k for k in kernels if stats.get(k, {}).get("launches", 0) == 0]
    assert not missing, f"kernels never launched through the emulation: {missing}"
    assert _ext.ext().cuda_emulation_race_check()
    for k in package:
        s = stats[k]
        assert s["races"] == 0 and s["failed"] == 0 and s["refused"] == 0, (k, s)
        assert s["shared_accesses"] + s["global_accesses"] > 0, f"the race check saw no access of {k}"
