"""fastmaml.nn.PerStepBatchNorm2d on its own: per-step affine parameters and running
statistics, the step index, the recorded-statistics update."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from fastmaml.nn import PerStepBatchNorm2d, StepSchedule


def _layer(K=3, C=2, **kw):
    torch.manual_seed(0)
    m = PerStepBatchNorm2d(C, steps=K, **kw).double()
    with torch.no_grad():
        if m.affine:
            m.weight.copy_(torch.randn(K, C))
            m.bias.copy_(torch.randn(K, C))
        if m.track_running_stats:
            m.running_mean.copy_(torch.randn(K, C))
            m.running_var.copy_(torch.rand(K, C) + 0.5)
    return m


def test_step_indexes_weights_and_clamps_past_k():
    m = _layer()
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    for k in range(5):
        m.set_step(k)
        s = min(k, 2)
        assert m.step == s
        want = F.batch_norm(x, None, None, m.weight[s], m.bias[s], True, 0.0, m.eps)
        assert torch.equal(m(x), want)


def test_eval_uses_running_stats_of_the_step():
    m = _layer().eval()
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    m.set_step(1)
    want = (x - m.running_mean[1].view(1, -1, 1, 1)) / torch.sqrt(m.running_var[1].view(1, -1, 1, 1) + m.eps)
    want = want * m.weight[1].view(1, -1, 1, 1) + m.bias[1].view(1, -1, 1, 1)
    assert torch.allclose(m(x), want, atol=1e-14, rtol=0)
    m2 = _layer(track_running_stats=False).eval()
    m2.set_step(1)
    assert torch.allclose(m2(x), F.batch_norm(x, None, None, m2.weight[1], m2.bias[1], True, 0.0, 1e-5))


def test_recorded_statistics_update_is_order_independent():
    m = _layer(momentum=0.3)
    xs = [torch.randn(5, 2, 3, 3, dtype=torch.float64) for _ in range(4)]
    rm0, rv0 = m.running_mean.clone(), m.running_var.clone()
    twin = copy.deepcopy(m)
    twin._state = type(m._state)()  # an independent recorder for the twin
    with torch.no_grad():
        twin.running_mean.copy_(rm0)
        twin.running_var.copy_(rv0)
    for layer, order in ((m, [0, 1, 2, 3]), (twin, [3, 1, 0, 2])):
        sched = StepSchedule(torch.nn.Sequential(layer), steps=3)
        sched.begin()
        for i in order:
            with sched.at(1, record=True):
                layer(xs[i])
            layer(xs[i])  # not recorded: outside the context
        sched.end()
    mean = torch.stack([x.mean((0, 2, 3)) for x in xs]).mean(0)
    var = torch.stack([x.var((0, 2, 3)) for x in xs]).mean(0)
    assert torch.allclose(m.running_mean[1], 0.7 * rm0[1] + 0.3 * mean, atol=1e-15, rtol=0)
    assert torch.allclose(m.running_var[1], 0.7 * rv0[1] + 0.3 * var, atol=1e-15, rtol=0)
    assert torch.equal(m.running_mean[[0, 2]], rm0[[0, 2]]) and torch.equal(m.running_var[[0, 2]], rv0[[0, 2]])
    assert torch.equal(m.running_mean, twin.running_mean) and torch.equal(m.running_var, twin.running_var)


def test_copies_share_the_step_state():
    m = _layer()
    c = copy.deepcopy(m)
    m.set_step(2)
    assert c.step == 2


def test_bad_arguments():
    with pytest.raises(ValueError, match="steps"):
        PerStepBatchNorm2d(2, steps=0)
    with pytest.raises(ValueError, match="momentum"):
        PerStepBatchNorm2d(2, steps=2, momentum=1.5)
    with pytest.raises(ValueError, match="eps"):
        PerStepBatchNorm2d(2, steps=2, eps=0.0)
    m = PerStepBatchNorm2d(2, steps=2)
    with pytest.raises(ValueError, match="channels"):
        m(torch.randn(2, 3, 2, 2))
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        m(torch.randn(2, 2, 2))
    with pytest.raises(ValueError, match="step index"):
        m.set_step(-1)
    with pytest.raises(ValueError, match="steps=3"):
        StepSchedule(torch.nn.Sequential(m), steps=3)
