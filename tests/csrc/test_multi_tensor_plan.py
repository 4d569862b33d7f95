"""The multi-tensor planner of csrc/multi_tensor/multi_tensor.h (the chunk tables of the
CUDA launchers), through ``fastmaml._C.multi_tensor_plan``: tested without a GPU."""

from __future__ import annotations

import random

from fastmaml import _ext


def _check_plan(cols, rows, cc, rc, mt, mb):
    plan = _ext.ext().multi_tensor_plan(cols, rows, cc, rc, mt, mb)
    seen = []
    expect_first = 0
    for launch in plan["launches"]:
        assert launch["first_block"] == expect_first
        assert 1 <= len(launch["tensors"]) <= mt and 1 <= len(launch["block_slot"]) <= mb
        for b, slot in enumerate(launch["block_slot"]):
            seen.append((launch["tensors"][slot], launch["block_col"][b], launch["block_row"][b], launch["first_block"] + b))
        expect_first += len(launch["block_slot"])
    want = [(i, c, r) for i, n in enumerate(cols) for r in range(-(-rows // rc)) for c in range(-(-n // cc)) if n]
    assert [s[:3] for s in seen] == want  # every chunk exactly once, tensors in order
    assert plan["total_blocks"] == len(want)
    for i, n in enumerate(cols):  # each tensor's blocks are contiguous global numbers
        mine = [s[3] for s in seen if s[0] == i]
        assert len(mine) == plan["tensor_blocks"][i]
        if mine:
            assert mine == list(range(plan["tensor_first_block"][i], plan["tensor_first_block"][i] + len(mine)))
    return plan


def test_multi_tensor_plan_tables():
    rng = random.Random(0)
    for _ in range(30):
        cols = [rng.choice([0, 1, 5, 255, 256, 257, 1000, 4097]) for _ in range(rng.randint(1, 40))]
        _check_plan(cols, rng.randint(1, 40), rng.choice([1, 32, 256]), rng.choice([1, 4, 16]), rng.randint(1, 24), rng.randint(1, 64))
    # the CUDA launcher's own capacities
    mt, mb, threads, rows = _ext.ext().SGD_STEP_CUDA_TABLE
    plan = _check_plan([36864, 64] * 20, 32, threads, rows, mt, mb)
    assert all(len(l["tensors"]) <= mt for l in plan["launches"]) and not plan["needs_index64"]


def test_multi_tensor_plan_64bit_tensors():
    """Planning of tensors past 2^31 elements (no memory is touched): the chunk
    indices stay within int32, the totals are exact and 64-bit indexing is selected
    exactly when some tensor has T·N >= 2^31."""
    C = _ext.ext()
    big = 3_000_000_000
    plan = C.multi_tensor_plan([5, big], 1, 256, 1, 24, 1 << 30)
    assert plan["needs_index64"]
    assert plan["tensor_blocks"] == [1, -(-big // 256)]
    last = plan["launches"][-1]
    assert max(last["block_col"]) == -(-big // 256) - 1
    assert not C.multi_tensor_plan([2**30], 1, 256, 1, 24, 1 << 30)["needs_index64"]
    assert C.multi_tensor_plan([2**30], 2, 256, 1 << 30, 24, 1 << 30)["needs_index64"]  # T·N = 2^31
    assert not C.multi_tensor_plan([2**31 - 1], 1, 1 << 20, 1, 24, 1 << 30)["needs_index64"]
