"""The MAML layer's FusedBatchNorm mode (fastmaml/maml/batch_norm_mode.py): which F.batch_norm calls
it routes to fastmaml.ops.batch_norm, and the op inside the generic MAML path."""

from __future__ import annotations

import pytest
import torch
from tests.maml.cases import F64, conv_bn_net, module_fn, module_params

from fastmaml import _ext
from fastmaml.maml import functional as generic
from fastmaml.maml import batch_norm_mode as bn
from fastmaml.ops import _batch_norm as bn_op

needs_ext = pytest.mark.skipif(_ext._C is None, reason=_ext.IMPORT_ERROR or "extension not built")



def test_mode_routes_only_what_it_covers(monkeypatch):
    calls = []
    real = bn_op.run_checked  # what the mode calls
    monkeypatch.setattr(bn_op, "run_checked", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(4, 3, 5, 5, dtype=F64)
    with bn.FusedBatchNorm():
        torch.nn.BatchNorm2d(3, track_running_stats=False).double()(x)  # covered
        assert len(calls) == 1
        torch.nn.BatchNorm2d(3).double()(x)  # updates running statistics: PyTorch's
        torch.nn.BatchNorm2d(3, affine=False, track_running_stats=False).double()(x)  # not affine
        torch.nn.BatchNorm2d(3).double().eval()(x)  # running statistics
        torch.nn.BatchNorm2d(3, track_running_stats=False).half()(x.half())  # float16
        m = torch.nn.BatchNorm2d(3, track_running_stats=False).double()
        torch.func.vmap(lambda z: torch.func.functional_call(m, dict(m.named_parameters()), (z,)))(x.unsqueeze(0))
        assert len(calls) == 1
    torch.nn.BatchNorm2d(3, track_running_stats=False).double()(x)  # outside the mode
    assert len(calls) == 1


# --- in the generic MAML path ------------------------------------------------------------
@needs_ext
@pytest.mark.parametrize("pool", [False, True])
def test_generic_path_fused_equals_native_and_is_used(pool, monkeypatch):
    torch.manual_seed(4)
    model = conv_bn_net(pool).double()
    params = module_params(model)
    g = torch.Generator().manual_seed(6)
    T = 3
    data = (torch.randn(T, 4, 1, 8, 8, generator=g, dtype=F64), torch.randint(0, 3, (T, 4), generator=g),
            torch.randn(T, 5, 1, 8, 8, generator=g, dtype=F64), torch.randint(0, 3, (T, 5), generator=g))
    calls = []
    real = bn_op.run_checked  # what the mode calls
    monkeypatch.setattr(bn_op, "run_checked", lambda *a: calls.append(1) or real(*a))
    res = []
    for fused in (True, False):
        p = {n: v.clone().requires_grad_(True) for n, v in params.items()}
        L = generic.maml_loss(module_fn(model), p, 0.3, *data, steps=3, loss="cross_entropy", task_map="loop",
                              hvp_map="loop", graph_memory_mb=0, fused_batch_norm=fused)
        res.append([L.detach(), *torch.autograd.grad(L, list(p.values()))])
        if fused:
            assert calls, "the fused BatchNorm was not used"
            n_fused = len(calls)
    assert len(calls) == n_fused  # fused_batch_norm=False: never
    for a, e in zip(*res):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
    with pytest.raises(TypeError, match="fused_batch_norm must be a bool"):
        generic.maml_loss(module_fn(model), params, 0.3, *data, steps=1, loss="cross_entropy", fused_batch_norm="yes")
