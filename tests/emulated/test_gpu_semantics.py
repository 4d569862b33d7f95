"""CUDA-tensor behaviour that only a GPU (or the GPU dry run, tests/emulated/gpu_dry_run.py,
where tensors report ``device == cuda:0``) can show. Marked ``cuda``: run by the device
check on the card and by the dry run in CI; skipped in the plain CPU run."""

from __future__ import annotations

import pytest
import torch

from fastmaml import ops
from fastmaml import reference as ref
from fastmaml.maml.functional import maml_loss
from fastmaml.maml.tasks import module_fn

pytestmark = pytest.mark.cuda


def _mlp():
    return torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).cuda()


def test_task_threads_above_one_refused_on_cuda_tensors():
    """Worker threads launch on their own default streams, unordered with the caller's."""
    model = _mlp()
    fn = module_fn(model)
    params = {n: p for n, p in model.named_parameters()}
    xs = torch.randn(4, 5, 2, device="cuda")
    ys = torch.randint(0, 3, (4, 5), device="cuda")
    with pytest.raises(ValueError, match="task_threads must be 1 .* for CUDA tensors"):
        maml_loss(fn, params, 0.1, xs, ys, xs, ys, steps=1, loss="cross_entropy", task_map="loop",
                          task_threads=2)
    loss = maml_loss(fn, params, 0.1, xs, ys, xs, ys, steps=1, loss="cross_entropy", task_map="loop",
                             task_threads=1)
    assert loss.device.type == "cuda"


def test_cuda_backend_on_cuda_tensors_matches_reference():
    g = torch.Generator().manual_seed(0)
    p = [torch.randn(3, 4, generator=g).cuda(), torch.randn(5, generator=g).cuda()]
    gr = [torch.randn(2, 3, 4, generator=g).cuda(), torch.randn(2, 5, generator=g).cuda()]
    out = ops.sgd_step(p, gr, 0.25, backend="cuda")
    assert all(o.device.type == "cuda" for o in out)
    for o, e in zip(out, ref.sgd_step([t.cpu() for t in p], [t.cpu() for t in gr], 0.25)):
        assert torch.allclose(o.cpu(), e, rtol=1e-6, atol=1e-7)
