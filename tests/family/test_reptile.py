"""Reptile against its reference (a loop over tasks), float64."""

from __future__ import annotations

import pytest
import torch
from family_cases import conv_bn, grads_of, image_batch, max_err, mlp, pure, regression_batch, zero_grads
from torch import nn

import fastmaml
from fastmaml.family import Reptile, reptile_direction
from fastmaml.reference import reptile as ref

LR, K = 0.1, 4


def _ce(pred, y):
    return torch.nn.functional.cross_entropy(pred, y) + 0.1 * pred.square().mean()


CASES = [  # id, model, batch, loss, task_map, expected path
    ("mlp-fused", mlp, regression_batch, "mse", "auto", "fused_mlp"),
    ("mlp-vmap", mlp, regression_batch, "mse", "vmap", "generic"),
    ("mlp-custom-loss", lambda: mlp(nn.ReLU), regression_batch, lambda p, y: (p - y).abs().mean(), "auto", "generic"),
    ("conv-bn-loop", conv_bn, image_batch, "cross_entropy", "auto", "generic"),
    ("conv-bn-vmap-custom", conv_bn, image_batch, _ce, "vmap", "generic"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_reference(case):
    _, make, batch, loss, tm, path = case
    model = make()
    xs, ys, _, _ = batch()
    r = Reptile(model, inner_lr=LR, inner_steps=K, loss=loss)
    r.task_map = tm
    val = r(xs, ys)
    assert r.path == path and not val.requires_grad
    d, v_ref = ref.reptile_direction(pure(model), dict(model.named_parameters()), xs, ys, inner_lr=LR,
                                     inner_steps=K, loss=loss)
    assert abs(float(val) - float(v_ref)) < 1e-10
    assert max_err(grads_of(model), d) < 1e-10


def test_accumulates_into_grad_and_sgd_is_plain_reptile():
    model = mlp()
    xs, ys, _, _ = regression_batch()
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    d, _ = ref.reptile_direction(pure(model), dict(model.named_parameters()), xs, ys, inner_lr=LR, inner_steps=K)
    r = Reptile(model, inner_lr=LR, inner_steps=K)
    r(xs, ys)
    r(xs, ys)
    assert max_err(grads_of(model), {n: 2 * v for n, v in d.items()}) < 1e-10
    zero_grads(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    r(xs, ys)
    opt.step()  # θ ← θ − ε (θ − mean φ)
    new = {n: p.detach() for n, p in model.named_parameters()}
    assert max_err(new, {n: theta[n] - 0.5 * d[n] for n in theta}) < 1e-12


def test_functional_form_reference_backend_adapt_predict():
    model = conv_bn()
    xs, ys, xq, _ = image_batch()
    params = dict(model.named_parameters())
    info: dict = {}
    d1, v1 = reptile_direction(model, params, xs, ys, inner_lr=LR, inner_steps=2, loss="cross_entropy", info=info)
    d2, v2 = reptile_direction(model, params, xs, ys, inner_lr=LR, inner_steps=2, loss="cross_entropy",
                               backend="reference")
    assert info["path"] == "generic" and max_err(d1, d2) < 1e-10 and abs(float(v1 - v2)) < 1e-12
    r = Reptile(model, inner_lr=LR, inner_steps=2, loss="cross_entropy")
    fast = r.adapt(xs, ys, steps=3)
    assert fast["5.weight"].shape == (3, 3, 8)
    d3, _ = ref.reptile_direction(pure(model), params, xs, ys, inner_lr=LR, inner_steps=3, loss="cross_entropy")
    assert max_err({n: params[n].detach() - f.mean(0) for n, f in fast.items()}, d3) < 1e-10
    assert r.predict(fast, xq).shape == (3, 5, 3)


def test_bad_arguments():
    with pytest.raises(ValueError, match="inner_lr"):
        Reptile(mlp(), inner_lr=0.0)
    with pytest.raises(ValueError, match="inner_steps"):
        Reptile(mlp(), inner_steps=0)
    with pytest.raises(ValueError, match="backend"):
        Reptile(mlp(), backend="tpu")
    xs, ys, _, _ = regression_batch()
    with pytest.raises(ValueError, match="tasks"):
        Reptile(mlp())(xs, ys[:2])
    with pytest.raises(ValueError, match="task_map"):
        reptile_direction(mlp(), dict(mlp().named_parameters()), xs, ys, inner_lr=0.1, inner_steps=1,
                          task_map="threads")
    psbn = nn.Sequential(nn.Conv2d(1, 2, 3), fastmaml.nn.PerStepBatchNorm2d(2, steps=2), nn.Flatten(),
                         nn.Linear(8, 3)).double()
    xi, yi, _, _ = image_batch()
    with pytest.raises(ValueError, match="PerStepBatchNorm2d"):
        Reptile(psbn, loss="cross_entropy")(xi, yi)
