"""The derivative flavours (fastmaml.maml.hvp): one interface, the same numbers. Each
flavour's (g, H u) per task, mapped by vmap and by the loop, with and without the fixed
tensors' mixed term, against an explicit per-task Hessian by torch.autograd.functional."""

from __future__ import annotations

import pytest
import torch

from fastmaml.maml import hvp
from fastmaml.maml.problem import check_problem
from tests.maml.cases import F64, assert_close, meta_batch, mlp_fn, mlp_params


def _problem(adapt):
    params = mlp_params((3, 5, 2))
    data = meta_batch(3, 4, 4, 3, 2)
    prob = check_problem(mlp_fn, params, 0.1, *data, steps=1, first_order=False, loss="mse", msl_weights=None,
                         adapt=adapt)
    return params, data, prob


@pytest.mark.parametrize("flavour", ["autograd", "rev_rev", "fwd_rev"])
@pytest.mark.parametrize("task_map", ["vmap", "loop"])
@pytest.mark.parametrize("anil", [False, True])
def test_every_flavour_gives_the_per_task_gradient_and_hvp(flavour, task_map, anil):
    params, (xs, ys, _, _), prob = _problem(["w1", "b1"] if anil else None)
    deriv = hvp.FLAVOURS[flavour](hvp.TaskLoss(mlp_fn, prob))
    assert isinstance(deriv, hvp.Derivatives)
    T = xs.shape[0]
    g_ = torch.Generator().manual_seed(5)
    pa = tuple(params[n] + 0.05 * torch.randn(T, *params[n].shape, generator=g_, dtype=F64) for n in prob.adapted)
    pf = tuple(params[n] for n in prob.fixed)
    u = tuple(torch.randn(T, *params[n].shape, generator=g_, dtype=F64) for n in prob.adapted)
    g, hv_a, hv_f = deriv.grad_hvp(pa, pf, xs, ys, u, False, anil, task_map)
    assert (hv_f is None) == (not anil)
    names = prob.adapted + prob.fixed
    na = sum(params[n].numel() for n in prob.adapted)
    want_f = 0
    for t in range(T):
        flat = torch.cat([p[t].reshape(-1) for p in pa] + [p.reshape(-1) for p in pf])
        shapes = [params[n].shape for n in names]

        def loss_of(v, t=t):
            parts, i = [], 0
            for s in shapes:
                parts.append(v[i:i + s.numel()].view(s))
                i += s.numel()
            return prob.loss_fn(mlp_fn(dict(zip(names, parts)), xs[t]), ys[t])

        H = torch.autograd.functional.hessian(loss_of, flat)
        grad = torch.autograd.functional.jacobian(loss_of, flat)
        ut = torch.cat([ui[t].reshape(-1) for ui in u])
        want_hv = H[:, :na] @ ut  # the tangent lives on the adapted tensors only
        assert_close(f"g task {t}", torch.cat([gi[t].reshape(-1) for gi in g]), grad[:na], 1e-10)
        assert_close(f"H_aa u task {t}", torch.cat([h[t].reshape(-1) for h in hv_a]), want_hv[:na], 1e-10)
        want_f = want_f + want_hv[na:]
    if anil:  # the fixed tensors' mixed term, summed over the tasks (vmapped autograd returns the sum)
        got_f = torch.cat([h.sum(0).reshape(-1) for h in hv_f])
        assert_close("sum_t H_fa u", got_f, want_f, 1e-10)


def test_bad_flavour_is_named():
    with pytest.raises(ValueError, match=r"hvp must be one of .*got 'newton'"):
        hvp.choose_hvp("newton")
    assert hvp.choose_hvp("auto") == "autograd"
