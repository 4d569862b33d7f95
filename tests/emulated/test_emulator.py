"""The CUDA emulation itself, on its own small kernels (csrc/common/cuda_emulation_selftest.cu):
barriers, the race check (and that it fires when a barrier is removed), a barrier reached
by part of a block, warp shuffles and votes, block order, atomics and the sm_90 launch
limits."""

from __future__ import annotations

import pytest
import torch

from fastmaml import _ext

THREADS = 128  # the block size of the block_sum self-test kernel


def C():
    return _ext.ext()


def run(name, *tensors, **kw):
    ptrs = [t.data_ptr() for t in tensors] + [0, 0]
    return C().cuda_emulation_selftest(name, ptrs[0], ptrs[1], **kw)


def test_block_sum_with_barriers_is_exact_and_race_free():
    x = torch.arange(4 * THREADS, dtype=torch.float32)
    out = torch.zeros(4)
    assert run("block_sum", x, out, n0=4, flag=True) == ""
    assert torch.equal(out, x.view(4, THREADS).sum(1))
    assert run("dynamic_sum", x, out, n0=4, n1=THREADS, flag=True) == ""
    assert torch.equal(out, x.view(4, THREADS).sum(1))


@pytest.mark.parametrize("kernel", ["block_sum", "dynamic_sum"])
def test_race_check_fires_when_the_barriers_are_removed(kernel):
    x = torch.ones(2 * THREADS)
    out = torch.zeros(2)
    before = C().cuda_emulation_stats().get(f"selftest_{kernel}_kernel", {}).get("races", 0)
    err = run(kernel, x, out, n0=2, n1=THREADS, flag=False)
    assert f"selftest_{kernel}_kernel<false>" in err
    assert "shared-memory race" in err and "thread (" in err and "since the last __syncthreads()" in err
    assert C().cuda_emulation_stats()[f"selftest_{kernel}_kernel"]["races"] > before
    # the error is reported through the launch check of the ops too: a RuntimeError
    assert run(kernel, x, out, n0=2, n1=THREADS, flag=True) == ""


def test_race_check_switch():
    x = torch.ones(THREADS)
    out = torch.zeros(1)
    C().cuda_emulation_set_race_check(False)
    try:
        assert C().cuda_emulation_race_check() is False
        assert run("block_sum", x, out, n0=1, flag=False) == ""  # unchecked: no report
    finally:
        C().cuda_emulation_set_race_check(True)
    assert "race" in run("block_sum", x, out, n0=1, flag=False)


def test_barrier_reached_by_part_of_a_block_is_reported_not_a_hang():
    out = torch.zeros(64)
    err = run("partial_barrier", out, n0=64)
    assert "selftest_partial_barrier_kernel" in err
    assert "__syncthreads() reached by only part of the block: 32 of 64 threads" in err
    assert "32 exited without reaching it" in err and "(32,0,0)" in err


def test_warp_collective_missing_lanes_is_reported():
    out = torch.zeros(32, dtype=torch.int32)
    err = run("warp_divergent", out)
    assert "selftest_warp_divergent_kernel" in err and "warp collective never completes" in err
    assert "16 thread(s) wait" in err


def test_warp_shuffles_and_votes_have_32_lane_semantics():
    n = 96  # three warps
    out = torch.full((n // 32 * 8,), -1, dtype=torch.int64)
    assert run("warp", out, n0=n) == ""
    o = out.view(-1, 8)
    for w in range(n // 32):
        lanes = torch.arange(w * 32, w * 32 + 32)
        assert o[w, 0] == lanes.sum()  # __shfl_down_sync tree: lane 0 holds the warp's sum
        assert o[w, 1] == lanes.sum()  # __shfl_xor_sync butterfly: every lane does
        assert o[w, 2] == w * 32 + 31  # __shfl_sync from lane 31
        assert o[w, 3] == w * 32 + 3   # lane 5's __shfl_up_sync by 2
        assert o[w, 4] == sum(1 << i for i in range(0, 32, 3))  # __ballot_sync(lane % 3 == 0)
        assert o[w, 5] == 1 and o[w, 6] == 1
        assert o[w, 7] == n // 2  # __syncthreads_count over the block
    assert C().cuda_emulation_stats()["selftest_warp_kernel"]["warp_ops"] > 0


def test_blocks_run_in_a_shuffled_order_and_atomics_count():
    blocks = 64
    counter = torch.zeros(1, dtype=torch.int32)
    order = torch.full((blocks,), -1, dtype=torch.int32)
    assert run("block_order", counter, order, n0=blocks) == ""
    assert int(counter) == blocks  # one atomicAdd per block
    assert sorted(order.tolist()) == list(range(blocks))
    assert order.tolist() != list(range(blocks)), "blocks ran in index order"


def test_global_memory_race_between_blocks_is_reported():
    out = torch.zeros(1)
    err = run("global_race", out, n0=4)
    assert "selftest_global_race_kernel" in err and "global-memory race" in err and "of block #" in err


def launch(grid=(1, 1, 1), block=(32, 1, 1), smem=0, opt_in=False):
    return C().cuda_emulation_selftest("launch", 0, 0, *grid, *block, smem, flag=opt_in)


def test_launch_limits_of_sm90():
    assert launch(block=(1024, 1, 1)) == ""
    assert launch(block=(32, 32, 1)) == ""
    assert "refused" in launch(block=(1025, 1, 1)) and "1024 threads" in launch(block=(1025, 1, 1))
    assert "refused" in launch(block=(64, 17, 1))  # 1088 threads
    assert "refused" in launch(block=(1, 1, 65))  # block.z <= 64
    assert "2^31" in launch(grid=(2**31, 1, 1))
    assert launch(grid=(1, 65535, 1), block=(1, 1, 1)) == ""
    assert "65535" in launch(grid=(1, 65536, 1))
    assert "65535" in launch(grid=(1, 1, 65536))
    assert "refused" in launch(grid=(0, 1, 1))
    assert launch(smem=48 * 1024) == ""
    err = launch(smem=48 * 1024 + 1)
    assert "refused" in err and "opt-in" in err
    assert launch(smem=227 * 1024, opt_in=True) == ""
    assert "232448" in launch(smem=227 * 1024 + 1, opt_in=True)
