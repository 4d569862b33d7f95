"""The generic adjoint path (fastmaml.maml.adjoint) against the reference, float64 to 1e-10,
every variant, MLPs and small 4-conv BatchNorm networks; BatchNorm correctness; float32
at K = 1; the once-differentiable error."""

from __future__ import annotations

import itertools

import pytest
import torch
from tests.maml.cases import (
    one_thread,
    F64,
    LR_KINDS,
    assert_close,
    conv_bn_net,
    lr_tensors,
    make_lrs,
    meta_batch,
    mlp_fn,
    mlp_params,
    module_fn,
    module_params,
)
from tests.maml.cases import conv_case as _conv_case

from fastmaml.maml import adjoint, dispatch, functional, plan, tasks
from fastmaml import reference as ref

TOL = 1e-10

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


def _both(fn, params, lrs, data, *, K, first_order=False, msl=None, adapt=None, loss="mse", task_map="auto",
          hvp="auto", hvp_map="auto", **extra):
    """(reference loss, grads) and (generic loss, grads) over params and learned lrs."""
    out = []
    for path in ("reference", "generic"):
        p = {n: v.detach().clone().requires_grad_(True) for n, v in params.items()}
        kw = dict(steps=K, first_order=first_order, msl_weights=msl, adapt=adapt, loss=loss)
        if path == "reference":
            L = ref.maml_loss(fn, p, lrs, *data, **kw)
        else:
            L = functional.maml_loss(fn, p, lrs, *data, task_map=task_map, hvp=hvp, hvp_map=hvp_map, **extra, **kw)
        wrt = list(p.values()) + [t for t in lr_tensors(lrs) if t.requires_grad]
        out.append((L.detach(), torch.autograd.grad(L, wrt)))
    return out


def _check(res, names, tol=TOL):
    (lr_, gr), (lg, gg) = res
    assert_close("meta-loss", lg, lr_, tol)
    labels = list(names) + [f"lr[{i}]" for i in range(len(gr) - len(names))]
    for lab, a, b in zip(labels, gg, gr):
        assert_close(f"d/d{lab}", a, b, tol)


MLP_CASES = list(itertools.product(LR_KINDS, [False, True], [None, "msl"], ["vmap", "loop"]))


@pytest.mark.parametrize("kind,first_order,msl,task_map", MLP_CASES)
def test_mlp_every_variant_matches_reference(kind, first_order, msl, task_map):
    K, T = 3, 3
    params = mlp_params()
    lrs = make_lrs(kind, [p.shape for p in params.values()], K)
    data = meta_batch(T, 5, 4, 3, 2)
    w = [0.3, 0.0, 1.0] if msl else None
    _check(_both(mlp_fn, params, lrs, data, K=K, first_order=first_order, msl=w, task_map=task_map), params)


@pytest.mark.parametrize("hvp", ["autograd", "rev_rev", "fwd_rev"])
@pytest.mark.parametrize("first_order", [False, True])
def test_mlp_hvp_modes_and_anil(hvp, first_order):
    K, T = 2, 2
    params = mlp_params()
    adapt = ["w2", "b2"]
    lrs = make_lrs("per_step_layer", [params[n].shape for n in adapt], K)
    data = meta_batch(T, 5, 4, 3, 2)
    _check(_both(mlp_fn, params, lrs, data, K=K, first_order=first_order, adapt=adapt, msl=[0.5, 1.0],
                 task_map="vmap", hvp=hvp), params)


@pytest.mark.parametrize("T,K", [(1, 1), (1, 4), (4, 1)])
@pytest.mark.parametrize("task_map", ["vmap", "loop"])
def test_mlp_edge_sizes(T, K, task_map):
    params = mlp_params((2, 5, 1))
    lrs = make_lrs("scalar", [], K)
    _check(_both(mlp_fn, params, lrs, meta_batch(T, 1, 3, 2, 1), K=K, task_map=task_map), params)


@pytest.mark.parametrize("loss", ["cross_entropy", "callable"])
def test_mlp_cross_entropy_and_callable(loss):
    K, T = 2, 2
    params = mlp_params((3, 6, 4))
    data = meta_batch(T, 6, 5, 3, 4, classes=None if loss == "callable" else 4)
    if loss == "callable":
        def loss_fn(pred, y):  # a smooth non-quadratic loss
            return torch.log(torch.cosh(pred - y)).mean()
    else:
        loss_fn = loss
    lrs = make_lrs("per_element", [p.shape for p in params.values()], K)
    for tm in ("vmap", "loop"):
        _check(_both(mlp_fn, params, lrs, data, K=K, loss=loss_fn, task_map=tm), params)


# --- convolutions with BatchNorm in batch-statistics mode ---------------------------------
CONV_CASES = [
    # (pool, task_map, hvp, kind, first_order, anil)
    (False, "loop", "auto", "scalar", False, False),
    (True, "loop", "auto", "per_step_layer", False, False),
    (False, "vmap", "autograd", "scalar", False, False),
    (True, "vmap", "autograd", "per_element", False, False),
    (True, "vmap", "rev_rev", "fixed", False, False),
    (False, "loop", "auto", "per_step_element", True, False),
    (True, "vmap", "autograd", "scalar", False, True),
    (False, "loop", "auto", "scalar", False, True),
]


@pytest.mark.parametrize("pool,task_map,hvp,kind,first_order,anil", CONV_CASES)
def test_conv_bn_matches_per_task_reference(pool, task_map, hvp, kind, first_order, anil):
    torch.manual_seed(0)
    model = conv_bn_net(pool).double()
    params = module_params(model)
    adapt = list(params)[-2:] if anil else None  # the linear head
    names = adapt or list(params)
    K, T = 2, 2
    lrs = make_lrs(kind, [params[n].shape for n in names], K, base=0.05)
    data = meta_batch(T, 3, 4, 1, 3, classes=3)
    data = (data[0].reshape(T, 3, 1, 1, 1).expand(T, 3, 1, 8, 8) * torch.randn(1, 1, 1, 8, 8, dtype=F64),
            data[1], data[2].reshape(T, 4, 1, 1, 1).expand(T, 4, 1, 8, 8) * torch.randn(1, 1, 1, 8, 8, dtype=F64),
            data[3])
    data = (data[0].contiguous(), data[1], data[2].contiguous(), data[3])
    res = _both(module_fn(model), params, lrs, data, K=K, first_order=first_order, adapt=adapt,
                loss="cross_entropy", task_map=task_map, hvp=hvp, msl=[0.5, 1.0])
    _check(res, params)


# The backward's HVPs mapped differently from the forward (hvp_map), every flavour.
HVP_MAP_CASES = [
    # (pool, task_map, hvp, hvp_map, kind, first_order, anil)
    (False, "loop", "auto", "vmap", "scalar", False, False),
    (True, "loop", "auto", "vmap", "per_step_layer", False, False),
    (True, "loop", "auto", "loop", "per_element", False, False),
    (False, "loop", "rev_rev", "vmap", "scalar", False, False),
    (True, "loop", "fwd_rev", "vmap", "fixed", False, False),
    (False, "vmap", "autograd", "loop", "scalar", False, False),
    (True, "loop", "auto", "vmap", "scalar", False, True),
    (False, "loop", "auto", "vmap", "per_step_element", True, False),
]


@pytest.mark.parametrize("pool,task_map,hvp,hvp_map,kind,first_order,anil", HVP_MAP_CASES)
def test_conv_bn_hvp_map_matches_per_task_reference(pool, task_map, hvp, hvp_map, kind, first_order, anil):
    torch.manual_seed(2)
    model = conv_bn_net(pool).double()
    params = module_params(model)
    adapt = list(params)[-2:] if anil else None
    names = adapt or list(params)
    K, T = 3, 3
    lrs = make_lrs(kind, [params[n].shape for n in names], K, base=0.05)
    g = torch.Generator().manual_seed(5)
    data = (torch.randn(T, 3, 1, 8, 8, generator=g, dtype=F64), torch.randint(0, 3, (T, 3), generator=g),
            torch.randn(T, 4, 1, 8, 8, generator=g, dtype=F64), torch.randint(0, 3, (T, 4), generator=g))
    res = _both(module_fn(model), params, lrs, data, K=K, first_order=first_order, adapt=adapt,
                loss="cross_entropy", task_map=task_map, hvp=hvp, hvp_map=hvp_map, msl=[0.3, 0.0, 1.0],
                graph_memory_mb=0)  # recompute the steps before the last: they use hvp_map
    _check(res, params)


def test_hvp_map_auto_rule_and_bad_value():
    img_small = torch.zeros(2, 5, 1, 4, 4)
    img_large = torch.zeros(2, dispatch.SMALL_SUPPORT + 1, 1, 4, 4)
    flat = torch.zeros(2, 5, 3)
    assert dispatch.choose_hvp_map("auto", "loop", img_small) == "vmap"
    assert dispatch.choose_hvp_map("auto", "loop", img_large) == ""
    assert dispatch.choose_hvp_map("auto", "vmap", img_small) == ""
    assert dispatch.choose_hvp_map("auto", "loop", flat) == ""
    assert dispatch.choose_hvp_map("loop", "loop", img_small) == "loop"
    params = {n: v.requires_grad_(True) for n, v in mlp_params().items()}
    data = meta_batch(2, 3, 3, 3, 2)
    with pytest.raises(ValueError, match="hvp_map"):
        functional.maml_loss(mlp_fn, params, 0.1, *data, steps=1, hvp_map="grouped")


@pytest.mark.parametrize("task_map,hvp,hvp_map", [("loop", "auto", "loop"), ("loop", "auto", "vmap"),
                                                  ("loop", "rev_rev", "vmap"), ("loop", "fwd_rev", "vmap"),
                                                  ("vmap", "autograd", "auto"), ("vmap", "fwd_rev", "auto"),
                                                  ("vmap", "rev_rev", "auto")])
def test_conv_bias_before_batchnorm_has_zero_meta_gradient(task_map, hvp, hvp_map):
    # BN subtracts the per-channel batch mean, so a conv bias feeding it cancels
    # exactly: every inner gradient and the meta-gradient w.r.t. it are 0. The
    # functorch#534 bug (grad through vmap(grad(batch_norm))) gives ~1e-2 here.
    torch.manual_seed(1)
    model = conv_bn_net(False).double()
    params = module_params(model)
    g = torch.Generator().manual_seed(3)
    xs = torch.randn(1, 4, 1, 8, 8, generator=g, dtype=F64)
    xq = torch.randn(1, 5, 1, 8, 8, generator=g, dtype=F64)
    ys = torch.randint(0, 3, (1, 4), generator=g)
    yq = torch.randint(0, 3, (1, 5), generator=g)
    p = {n: v.clone().requires_grad_(True) for n, v in params.items()}
    L = functional.maml_loss(module_fn(model), p, 0.4, xs, ys, xq, yq, steps=3, loss="cross_entropy",
                          task_map=task_map, hvp=hvp, hvp_map=hvp_map)
    grads = dict(zip(p, torch.autograd.grad(L, list(p.values()))))
    for n in ("0.bias", "3.bias", "6.bias", "9.bias"):
        assert float(grads[n].abs().max()) < 1e-12, (n, grads[n])
    assert float(grads["0.weight"].abs().max()) > 1e-6  # the weights do get a gradient


def test_float32_at_k1_matches_float64_reference():
    K, T = 1, 3
    p64 = mlp_params()
    data64 = meta_batch(T, 5, 4, 3, 2)
    lr64 = make_lrs("per_step_layer", [v.shape for v in p64.values()], K)
    (l64, g64), _ = _both(mlp_fn, p64, lr64, data64, K=K)
    p32 = {n: v.float().requires_grad_(True) for n, v in p64.items()}
    lr32 = lr64.detach().float().requires_grad_(True)
    L = functional.maml_loss(mlp_fn, p32, lr32, *(d.float() if d.is_floating_point() else d for d in data64), steps=K)
    g32 = torch.autograd.grad(L, list(p32.values()) + [lr32])
    assert_close("meta-loss f32", L.detach().double(), l64, 1e-5)
    for i, (a, b) in enumerate(zip(g32, g64)):
        assert_close(f"grad f32 [{i}]", a.double(), b, 1e-5)


def test_double_backward_raises_clearly():
    params = {n: v.requires_grad_(True) for n, v in mlp_params().items()}
    L = functional.maml_loss(mlp_fn, params, 0.1, *meta_batch(2, 4, 4, 3, 2), steps=2)
    g = torch.autograd.grad(L, list(params.values()), create_graph=True)
    with pytest.raises(RuntimeError, match="once-differentiable"):
        sum(x.sum() for x in g).backward()


def test_inputs_and_params_unchanged():
    params = {n: v.requires_grad_(True) for n, v in mlp_params().items()}
    before = {n: v.detach().clone() for n, v in params.items()}
    data = meta_batch(2, 4, 4, 3, 2)
    copies = [d.clone() for d in data]
    lrs = make_lrs("per_element", [v.shape for v in params.values()], 2)
    lr_before = [t.detach().clone() for t in lrs]
    for tm in ("vmap", "loop"):
        L = functional.maml_loss(mlp_fn, params, lrs, *data, steps=2, task_map=tm)
        L.backward()
    for n in params:
        assert torch.equal(params[n].detach(), before[n]), n
    for a, b in zip(data, copies):
        assert torch.equal(a, b)
    for a, b in zip(lrs, lr_before):
        assert torch.equal(a.detach(), b)


def test_adapt_and_predict_match_reference():
    params = mlp_params()
    xs, ys, xq, _ = meta_batch(3, 5, 4, 3, 2)
    lrs = make_lrs("per_element", [v.shape for v in params.values()], 3)
    lr_head = [lrs[-2], lrs[-1]]
    want = ref.maml_adapt(mlp_fn, params, lr_head, xs, ys, steps=3, adapt=["w2", "b2"])
    for tm in ("vmap", "loop"):
        got = functional.adapt(mlp_fn, params, lr_head, xs, ys, steps=3, adapt=["w2", "b2"], task_map=tm)
        for n in params:
            assert_close(f"fast[{n}] ({tm})", got[n], want[n], 1e-12)
        pred = functional.predict(mlp_fn, got, xq, task_map=tm)
        for t in range(3):
            assert_close(f"pred[{t}]", pred[t], mlp_fn({n: v[t] for n, v in want.items()}, xq[t]), 1e-12)


@pytest.mark.parametrize("task_map", ["vmap", "loop"])
def test_anil_k1_learned_lr(task_map):
    # K = 1: the only inner step is the one whose support graph is kept for the backward
    params = mlp_params()
    adapt = ["w1", "b1", "w2"]
    lrs = make_lrs("per_element", [params[n].shape for n in adapt], 1)
    _check(_both(mlp_fn, params, lrs, meta_batch(3, 4, 5, 3, 2), K=1, adapt=adapt, task_map=task_map), params)


# --- concurrent tasks (task_threads) and kept support graphs (graph_memory_mb) ------------
@pytest.mark.parametrize("kind,first_order,anil", [("scalar", False, False), ("per_step_layer", False, True),
                                                   ("per_element", True, False)])
@pytest.mark.parametrize("graph_mb", [0, dispatch.GRAPH_MEMORY_MB])
def test_conv_bn_concurrent_tasks_match_reference(kind, first_order, anil, graph_mb):
    """Tasks run two at a time on worker threads (tasks.module_fn: a module replica
    per thread), with and without the earlier steps' graphs kept: same meta-gradient."""
    model, data = _conv_case()
    params = module_params(model)
    adapt = list(params)[-2:] if anil else None
    K = 3
    lrs = make_lrs(kind, [params[n].shape for n in adapt or list(params)], K, base=0.05)
    res = _both(tasks.module_fn(model), params, lrs, data, K=K, first_order=first_order, adapt=adapt,
                loss="cross_entropy", task_map="loop", msl=[0.3, 0.0, 1.0], task_threads=2,
                graph_memory_mb=graph_mb)
    _check(res, params)


@pytest.mark.parametrize("graph_mb,kept_steps", [(dispatch.GRAPH_MEMORY_MB, 3), (0, 1), (1e-6, 1)])
def test_support_graphs_kept_within_budget(monkeypatch, graph_mb, kept_steps):
    """Within the budget every step's support graph is kept (no recomputation in the
    backward); over it (or at 0) only the last one, the rest recomputed."""
    model, data = _conv_case()
    params = {n: p.requires_grad_(True) for n, p in module_params(model).items()}
    calls = {"kept": 0, "recomputed": 0}
    kept, rec = plan.Plan.support_grads_kept, plan.Plan.grad_hvp

    def spy_kept(self, *a, **k):
        calls["kept"] += 1
        return kept(self, *a, **k)

    def spy_rec(self, *a, **k):
        calls["recomputed"] += 1
        return rec(self, *a, **k)

    monkeypatch.setattr(plan.Plan, "support_grads_kept", spy_kept)
    monkeypatch.setattr(plan.Plan, "grad_hvp", spy_rec)
    M = functional.maml_loss(tasks.module_fn(model), params, 0.05, *data, steps=3, loss="cross_entropy",
                          graph_memory_mb=graph_mb)
    torch.autograd.grad(M, list(params.values()))
    if kept_steps == 3:
        assert calls == {"kept": 3, "recomputed": 0}
    else:  # step 0 is measured (kept, then dropped when over budget) unless the budget is 0
        assert calls["recomputed"] == 2
        assert calls["kept"] == (1 if graph_mb == 0 else 2)


@pytest.mark.parametrize("kind,first_order,anil", [("scalar", False, False), ("per_step_layer", False, True),
                                                   ("per_element", True, False)])
def test_one_task_at_a_time_matches_all_tasks_at_once(monkeypatch, kind, first_order, anil):
    """The serial per-task loop runs each task's forward and adjoint in the forward
    (per_task): one adjoint per task there, the backward only scales the result by the
    incoming gradient. Same meta-loss and meta-gradients (θ, φ, learned lrs) as all tasks
    at once (two worker threads: one adjoint over all tasks in the backward), and 3·M
    gives 3× the gradients."""
    model, data = _conv_case(T=3)
    params = module_params(model)
    adapt = list(params)[-2:] if anil else None
    names = adapt or list(params)
    lrs = make_lrs(kind, [params[n].shape for n in names], 3, base=0.05)
    seen = []
    real = adjoint._adjoint
    monkeypatch.setattr(adjoint, "_adjoint", lambda plan, st, *a: seen.append(st.xs.shape[0]) or real(plan, st, *a))
    out = []
    for threads, factor in ((1, 1.0), (2, 1.0), (1, 3.0)):
        p = {n: v.clone().requires_grad_(True) for n, v in params.items()}
        seen.clear()
        M = functional.maml_loss(tasks.module_fn(model), p, lrs, *data, steps=3, first_order=first_order,
                              adapt=adapt, loss="cross_entropy", task_map="loop", hvp_map="loop",
                              task_threads=threads, msl_weights=[0.3, 0.0, 1.0])
        assert seen == ([1, 1, 1] if threads == 1 else [])  # per task, in the forward
        wrt = list(p.values()) + [t for t in lr_tensors(lrs) if t.requires_grad]
        grads = torch.autograd.grad(factor * M, wrt)
        assert seen == ([1, 1, 1] if threads == 1 else [3])
        out.append((M.detach(), [g / factor for g in grads]))
    for M, grads in out[1:]:
        assert_close("meta-loss", M, out[0][0], 1e-12)
        for i, (a, b) in enumerate(zip(grads, out[0][1])):
            assert_close(f"grad {i}", a, b, 1e-11)
