"""The reference MAML (unrolled autograd, loop over tasks) against `higher` and against
a hand-written per-task unrolled loop, float64."""

from __future__ import annotations

import pytest
import torch
from tests.maml.cases import one_thread, F64, assert_close, make_lrs, meta_batch, mlp_fn, mlp_params
from torch import nn

from fastmaml import reference as ref

higher = pytest.importorskip("higher")

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


def _by_hand(params, lr_of, xs, ys, xq, yq, K, first_order, msl, adapt):
    """Per-task unrolled MAML written out in full (independent of the reference code)."""
    total = 0.0
    T = xs.shape[0]
    for t in range(T):
        p = dict(params)
        for k in range(K):
            ls = ((mlp_fn(p, xs[t]) - ys[t]) ** 2).mean()
            names = [n for n in p if n in adapt]
            gs = torch.autograd.grad(ls, [p[n] for n in names], create_graph=True)
            p = dict(p)
            for i, (n, g) in enumerate(zip(names, gs)):
                p[n] = p[n] - lr_of(k, i) * (g.detach() if first_order else g)
            if msl[k]:
                total = total + msl[k] * ((mlp_fn(p, xq[t]) - yq[t]) ** 2).mean()
    return total / T


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("kind", ["fixed", "per_step_layer", "per_element"])
@pytest.mark.parametrize("anil", [False, True])
def test_reference_matches_hand_written_unroll(first_order, kind, anil):
    K, T = 3, 2
    params = {n: p.requires_grad_(True) for n, p in mlp_params().items()}
    adapt = ["w2", "b2"] if anil else list(params)
    lrs = make_lrs(kind, [params[n].shape for n in adapt], K)
    msl = [0.25, 0.0, 1.0]
    xs, ys, xq, yq = meta_batch(T, 5, 4, 3, 2)

    def lr_of(k, i):
        if kind == "fixed":
            return lrs
        if kind == "per_step_layer":
            return lrs[k, i]
        return lrs[i]

    want = _by_hand(params, lr_of, xs, ys, xq, yq, K, first_order, msl, adapt)
    got = ref.maml_loss(mlp_fn, params, lrs, xs, ys, xq, yq, steps=K, first_order=first_order, msl_weights=msl,
                        adapt=adapt if anil else None)
    wrt = list(params.values()) + ([lrs] if isinstance(lrs, torch.Tensor) else list(lrs) if isinstance(lrs, list) else [])
    gw = torch.autograd.grad(want, wrt)
    gg = torch.autograd.grad(got, wrt)
    assert_close("meta-loss", got.detach(), want.detach(), 1e-12)
    for i, (a, b) in enumerate(zip(gg, gw)):
        assert_close(f"grad[{i}]", a, b, 1e-12)


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.l0, self.l1, self.l2 = nn.Linear(3, 7), nn.Linear(7, 5), nn.Linear(5, 2)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(torch.tanh(self.l0(x)))))


@pytest.mark.parametrize("K,T", [(1, 1), (3, 2)])
def test_reference_matches_higher(K, T):
    torch.manual_seed(0)
    model = _MLP().double()
    lr = 0.3
    xs, ys, xq, yq = meta_batch(T, 6, 5, 3, 2)
    # higher: differentiable SGD inner loop per task, one backward of the mean.
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    total = 0.0
    for t in range(T):
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(K):
                diffopt.step(((fmodel(xs[t]) - ys[t]) ** 2).mean())
            total = total + ((fmodel(xq[t]) - yq[t]) ** 2).mean()
    want = total / T
    gw = torch.autograd.grad(want, list(model.parameters()))
    params = dict(model.named_parameters())
    got = ref.maml_loss(lambda p, x: torch.func.functional_call(model, p, (x,)), params, lr, xs, ys, xq, yq, steps=K)
    gg = torch.autograd.grad(got, list(params.values()))
    assert_close("meta-loss", got.detach(), want.detach(), 1e-12)
    for n, a, b in zip(params, gg, gw):
        assert_close(f"d/d{n}", a, b, 1e-12)


def test_reference_cross_entropy_and_callable_loss_agree():
    K, T = 2, 2
    params = {n: p.requires_grad_(True) for n, p in mlp_params((3, 6, 4)).items()}
    xs, ys, xq, yq = meta_batch(T, 5, 4, 3, 4, classes=4)
    a = ref.maml_loss(mlp_fn, params, 0.2, xs, ys, xq, yq, steps=K, loss="cross_entropy")
    b = ref.maml_loss(mlp_fn, params, 0.2, xs, ys, xq, yq, steps=K,
                      loss=lambda p, y: torch.nn.functional.cross_entropy(p, y))
    assert_close("ce", a.detach(), b.detach(), 1e-14)


def test_reference_adapt_equals_unrolled_steps():
    params = mlp_params()
    xs, ys, _, _ = meta_batch(2, 5, 4, 3, 2)
    fast = ref.maml_adapt(mlp_fn, params, 0.1, xs, ys, steps=2)
    for t in range(2):
        p = {n: v.clone().requires_grad_(True) for n, v in params.items()}
        for _ in range(2):
            g = torch.autograd.grad(((mlp_fn(p, xs[t]) - ys[t]) ** 2).mean(), list(p.values()))
            p = {n: (v - 0.1 * gi).detach().requires_grad_(True) for (n, v), gi in zip(p.items(), g)}
        for n in params:
            assert_close(f"fast[{n}][{t}]", fast[n][t], p[n].detach(), 1e-13)


def test_reference_gradcheck_learned_lr():
    params = {n: p.requires_grad_(True) for n, p in mlp_params((2, 3, 1)).items()}
    xs, ys, xq, yq = meta_batch(2, 3, 3, 2, 1)
    lr = torch.tensor(0.2, dtype=F64, requires_grad=True)

    def f(lr_, w0):
        p = dict(params)
        p["w0"] = w0
        return ref.maml_loss(mlp_fn, p, lr_, xs, ys, xq, yq, steps=2)

    assert torch.autograd.gradcheck(f, (lr, params["w0"]))
