"""fastmaml.MAML with MAML++ per-step BatchNorm against the unrolled reference
(fastmaml.reference.per_step_bn), float64: meta-loss, meta-gradient, the per-step
running statistics, evaluation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastmaml
from fastmaml.nn import PerStepBatchNorm2d
from fastmaml.reference import per_step_bn

K = 2


def net(seed=0, track=True):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), PerStepBatchNorm2d(3, steps=K, track_running_stats=track),
                      nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 2, 3, padding=1),
                      PerStepBatchNorm2d(2, steps=K, momentum=0.2, track_running_stats=track), nn.ReLU(),
                      nn.Flatten(), nn.Linear(2 * 2 * 2, 3)).double()
    with torch.no_grad():  # distinct per-step entries
        for bn in (m[1], m[5]):
            bn.weight.add_(0.3 * torch.randn_like(bn.weight))
            bn.bias.add_(0.3 * torch.randn_like(bn.bias))
    return m


def batch(T=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(T, 5, 1, 4, 4, generator=g, dtype=torch.float64)
    xq = torch.randn(T, 4, 1, 4, 4, generator=g, dtype=torch.float64)
    return xs, torch.randint(0, 3, (T, 5), generator=g), xq, torch.randint(0, 3, (T, 4), generator=g)


def _grads(m):
    return {n: p.grad.clone() for n, p in m.named_parameters()}


CASES = [  # id, first_order, msl, task_map, track_running_stats
    ("second-order-loop", False, None, "auto", True),
    ("first-order-msl", True, [0.4, 0.6], "auto", True),
    ("second-order-msl-vmap-batch-stats", False, [0.5, 0.5], "vmap", False),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_meta_step_matches_reference(case):
    _, fo, msl, tm, track = case
    fast_net, ref_net = net(track=track), net(track=track)
    xs, ys, xq, yq = batch()
    maml = fastmaml.MAML(fast_net, inner_lr=0.3, inner_steps=K, first_order=fo, loss="cross_entropy", msl_weights=msl)
    maml.task_map = tm
    out = maml(xs, ys, xq, yq)
    out.backward()
    params = dict(ref_net.named_parameters())
    want = per_step_bn.maml_loss(ref_net, params, 0.3, xs, ys, xq, yq, steps=K, first_order=fo,
                                 loss="cross_entropy", msl_weights=msl)
    want.backward()
    assert abs(float(out.detach()) - float(want.detach())) < 1e-12
    g, g_ref = _grads(fast_net), _grads(ref_net)
    for n in g:
        assert torch.allclose(g[n], g_ref[n], atol=1e-10, rtol=0), n
    assert g["1.weight"][1].abs().max() > 0  # the step-1 entries are trained too
    for i in (1, 5):
        if track:
            assert torch.allclose(fast_net[i].running_mean, ref_net[i].running_mean, atol=1e-12, rtol=0)
            assert torch.allclose(fast_net[i].running_var, ref_net[i].running_var, atol=1e-12, rtol=0)
            assert not torch.equal(fast_net[i].running_mean[1], torch.zeros(fast_net[i].num_features,
                                                                            dtype=torch.float64))


def test_running_stats_updated_once_per_outer_step_only():
    m = net()
    xs, ys, xq, yq = batch()
    maml = fastmaml.MAML(m, inner_lr=0.3, inner_steps=K, loss="cross_entropy")
    maml(xs, ys, xq, yq).backward()  # one outer step: one update
    after_one = m[1].running_mean.clone()
    with torch.no_grad():
        maml(xs, ys, xq, yq)  # evaluation: no update
    maml.eval()
    maml(xs, ys, xq, yq)  # maml.eval(): not an outer step
    assert torch.equal(m[1].running_mean, after_one)
    ref_net = net()
    per_step_bn.maml_loss(ref_net, dict(ref_net.named_parameters()), 0.3, xs, ys, xq, yq, steps=K,
                          loss="cross_entropy")
    assert torch.allclose(after_one, ref_net[1].running_mean, atol=1e-12, rtol=0)


def test_eval_mode_uses_running_stats_and_reference_backend_agrees():
    m, m_ref = net(), net()
    xs, ys, xq, yq = batch()
    for mm in (m, m_ref):
        fastmaml.MAML(mm, inner_lr=0.3, inner_steps=K, loss="cross_entropy")(xs, ys, xq, yq).backward()
        mm.zero_grad()
        mm.eval()  # BN now normalises with the per-step running statistics
    maml = fastmaml.MAML(m, inner_lr=0.3, inner_steps=K, loss="cross_entropy")
    maml_ref = fastmaml.MAML(m_ref, inner_lr=0.3, inner_steps=K, loss="cross_entropy", backend="reference")
    out, out_ref = maml(xs, ys, xq, yq), maml_ref(xs, ys, xq, yq)
    out.backward()
    out_ref.backward()
    assert maml_ref.path == "reference"
    assert abs(float(out.detach()) - float(out_ref.detach())) < 1e-12
    g, g_ref = _grads(m), _grads(m_ref)
    assert all(torch.allclose(g[n], g_ref[n], atol=1e-10, rtol=0) for n in g)


def test_adapt_past_k_reuses_the_last_entry_and_predict_uses_it():
    m = net()
    xs, ys, xq, _ = batch()
    maml = fastmaml.MAML(m, inner_lr=0.3, inner_steps=K, loss="cross_entropy")
    fast = maml.adapt(xs, ys, steps=4)
    names = [n for n, _ in m.named_parameters()]
    for t in range(3):
        p = {n: q.detach() for n, q in m.named_parameters()}
        for k in range(4):
            for bn in (m[1], m[5]):
                bn.set_step(k)
            leaves = {n: v.clone().requires_grad_(True) for n, v in p.items()}
            ls = nn.functional.cross_entropy(torch.func.functional_call(m, leaves, (xs[t],)), ys[t])
            gs = torch.autograd.grad(ls, [leaves[n] for n in names])
            p = {n: (leaves[n] - 0.3 * g).detach() for n, g in zip(names, gs)}
        assert all(torch.allclose(fast[n][t], p[n], atol=1e-12, rtol=0) for n in names)
    pred = maml.predict(fast, xq)
    assert m[1].step == K - 1
    want = torch.func.functional_call(m, {n: v[0] for n, v in fast.items()}, (xq[0],))
    assert torch.allclose(pred[0], want, atol=1e-12, rtol=0)


def test_layer_steps_must_match_inner_steps():
    with pytest.raises(ValueError, match="steps=3"):
        fastmaml.MAML(net(), inner_lr=0.1, inner_steps=3, loss="cross_entropy")
