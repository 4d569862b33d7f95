"""The references of the family against independent derivations."""

from __future__ import annotations

import torch
from torch import nn

from fastmaml import reference
from fastmaml.nn import PerStepBatchNorm2d
from fastmaml.reference import imaml, per_step_bn, reptile


def _pure(model):
    return lambda p, x: torch.func.functional_call(model, p, (x,))


def _batch(T=3, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return r(T, n, 3), r(T, n, 2), r(T, n + 1, 3), r(T, n + 1, 2)


def test_imaml_reference_is_the_limit_of_unrolled_differentiation():
    """For a linear model (quadratic support loss) the proximal inner loop converges
    geometrically; after enough steps, autograd through the unrolled loop equals the
    implicit gradient (I + H/λ)⁻¹ ∇Lq, which the reference computes by a dense solve."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    xs, ys, xq, yq = _batch()
    lr, lam, K = 0.1, 4.0, 120
    params = dict(model.named_parameters())
    val, g_imp = imaml.imaml_grad(_pure(model), params, xs, ys, xq, yq, inner_lr=lr, inner_steps=K, lam=lam)
    total = 0.0
    for t in range(3):
        phi = dict(params)
        for _ in range(K):
            ls = ((_pure(model)(phi, xs[t]) - ys[t]) ** 2).mean()
            gs = torch.autograd.grad(ls, list(phi.values()), create_graph=True)
            phi = {n: p - lr * (g + lam * (p - params[n])) for (n, p), g in zip(phi.items(), gs)}
        total = total + ((_pure(model)(phi, xq[t]) - yq[t]) ** 2).mean() / 3
    g_unr = torch.autograd.grad(total, list(params.values()))
    assert abs(float(total.detach()) - float(val)) < 1e-12
    for n, g in zip(params, g_unr):
        assert torch.allclose(g, g_imp[n], atol=1e-11, rtol=0)
    # the surrogate loss carries the same gradient
    out = imaml.imaml_loss(_pure(model), params, xs, ys, xq, yq, inner_lr=lr, inner_steps=K, lam=lam)
    for n, g in zip(params, torch.autograd.grad(out, list(params.values()))):
        assert torch.allclose(g, g_imp[n], atol=1e-15, rtol=0)


def test_reptile_reference_one_step_is_the_mean_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    xs, ys, _, _ = _batch()
    params = dict(model.named_parameters())
    d, _ = reptile.reptile_direction(_pure(model), params, xs, ys, inner_lr=0.3, inner_steps=1)
    for n, p in params.items():
        g = sum(torch.autograd.grad(((model(xs[t]) - ys[t]) ** 2).mean(), p)[0] for t in range(3)) / 3
        assert torch.allclose(d[n], 0.3 * g, atol=1e-15, rtol=0)


def test_per_step_bn_reference_with_tied_steps_is_plain_batch_norm_maml():
    """Per-step weights equal across steps, and not adapted in the inner loop (an
    adapted per-step weight moves only its own step's row), make the per-step net the
    plain batch-statistics BatchNorm net: the same meta-loss and meta-gradient (the
    per-step parameters' gradients summed over steps give the plain BN's)."""
    torch.manual_seed(0)
    K = 2
    plain = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2, track_running_stats=False), nn.ReLU(),
                          nn.Flatten(), nn.Linear(2 * 16, 3)).double()
    with torch.no_grad():
        plain[1].weight.copy_(torch.tensor([1.3, 0.7]))
        plain[1].bias.copy_(torch.tensor([0.1, -0.2]))
    per = nn.Sequential(plain[0], PerStepBatchNorm2d(2, steps=K), nn.ReLU(), nn.Flatten(), plain[4]).double()
    with torch.no_grad():
        per[1].weight.copy_(plain[1].weight.expand(K, 2))
        per[1].bias.copy_(plain[1].bias.expand(K, 2))
    g = torch.Generator().manual_seed(1)
    xs, xq = torch.randn(2, 5, 1, 4, 4, generator=g, dtype=torch.float64), torch.randn(2, 4, 1, 4, 4, generator=g,
                                                                                     dtype=torch.float64)
    ys, yq = torch.randint(0, 3, (2, 5), generator=g), torch.randint(0, 3, (2, 4), generator=g)
    kw = dict(steps=K, loss="cross_entropy", msl_weights=[0.3, 0.7], adapt=["0.weight", "0.bias", "4.weight", "4.bias"])
    pp, pq = dict(plain.named_parameters()), dict(per.named_parameters())
    m1 = reference.maml_loss(_pure(plain), pp, 0.2, xs, ys, xq, yq, **kw)
    m2 = per_step_bn.maml_loss(per, pq, 0.2, xs, ys, xq, yq, **kw)
    assert abs(float(m1.detach()) - float(m2.detach())) < 1e-14
    g1 = dict(zip(pp, torch.autograd.grad(m1, list(pp.values()))))
    g2 = dict(zip(pq, torch.autograd.grad(m2, list(pq.values()))))
    assert torch.allclose(g1["0.weight"], g2["0.weight"], atol=1e-13, rtol=0)
    assert torch.allclose(g1["1.weight"], g2["1.weight"].sum(0), atol=1e-13, rtol=0)
    assert torch.allclose(g1["4.bias"], g2["4.bias"], atol=1e-13, rtol=0)
    # running statistics: step k's entry moved toward the support batch statistics at θ_k
    assert not torch.equal(per[1].running_mean[0], torch.zeros(2, dtype=torch.float64))
    assert not torch.equal(per[1].running_mean[1], per[1].running_mean[0])
