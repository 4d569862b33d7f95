"""Launch details of the Triton backend that the GPU run found wrong, checked on the CPU
(through Triton's interpreter; these tests do not need the emulated CUDA build):
the grid folds task and tile into axis 0 (axes 1/2 stop at 65,535), the float32 HVP head
wider than 512 outputs launches with one pipeline stage (shared memory of sm_90), and
sgd_step launches on its tensors' device."""

from __future__ import annotations

import pytest
import torch

NEEDS_EMULATION = False  # conftest: run in every build

tmlp = pytest.importorskip("fastmaml.triton.mlp")
tsgd = pytest.importorskip("fastmaml.triton.sgd_step")


class Recorder:
    """Wraps a Triton kernel: records the grid of every launch, then launches."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


def test_grids_fold_tasks_and_tiles_into_axis_0(monkeypatch):
    recs = {}
    for name in ("_mlp_fwd_kernel", "_mlp_head_kernel", "_mlp_bwd_kernel"):
        recs[name] = Recorder(getattr(tmlp, name))
        monkeypatch.setattr(tmlp, name, recs[name])
    g = torch.Generator().manual_seed(0)
    T, N, dims = 2, 40, [3, 20, 4]
    ws = [torch.randn(T, dims[i + 1], dims[i], generator=g) for i in range(2)]
    bs = [torch.randn(T, dims[i + 1], generator=g) for i in range(2)]
    x = torch.randn(T, N, 3, generator=g)
    y = torch.randn(T, N, 4, generator=g)
    lt, gw, gb = tmlp.mlp_loss_and_grad(ws, bs, x, y)
    ref = __import__("fastmaml.reference", fromlist=["mlp_loss_and_grad"]).mlp_loss_and_grad(ws, bs, x, y)
    assert torch.allclose(lt, ref[0], rtol=1e-4, atol=1e-6)
    for name, rec in recs.items():
        assert rec.grids, name
        for grid in rec.grids:
            assert len(grid) == 1 and grid[0] % T == 0, (name, grid)  # (T · tiles,)
    assert max(g[0] for g in recs["_mlp_fwd_kernel"].grids) > T  # several tiles per task here


def test_grid_beyond_2_pow_31_programs_is_refused():
    assert tmlp._grid(3, 70_000) == (210_000,)  # past 65,535 tiles per task: fine on axis 0
    with pytest.raises(ValueError, match="exceeds the grid's 2\\*\\*31 - 1"):
        tmlp._grid(2**16, 2**15)


def test_wide_float32_hvp_head_uses_one_pipeline_stage():
    cuda = torch.device("cuda", 0)
    assert tmlp._head_options(cuda, torch.float32, 1024, True) == {"num_stages": 1}
    assert tmlp._head_options(cuda, torch.float32, 512, True) == {}
    assert tmlp._head_options(cuda, torch.float32, 1024, False) == {}
    assert tmlp._head_options(cuda, torch.float64, 1024, True) == {}
    assert tmlp._head_options(torch.device("cpu"), torch.float32, 1024, True) == {}


def test_sgd_step_launches_on_the_tensors_device():
    ctx = tsgd._on_device(torch.device("cuda", 1))
    assert isinstance(ctx, torch.cuda.device) and ctx.idx == 1
    assert not isinstance(tsgd._on_device(torch.device("cpu")), torch.cuda.device)
