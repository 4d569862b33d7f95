"""iMAML against the exact implicit gradient (explicit Hessian, float64), its paths
against each other, the lockstep CG, and its errors."""

from __future__ import annotations

import pytest
import torch
from family_cases import conv_bn, grads_of, image_batch, max_err, mlp, pure, regression_batch, zero_grads
from torch import nn

import fastmaml
from fastmaml.family import iMAML, batched_cg, imaml_loss
from fastmaml.family.tasks import MlpTasks
from fastmaml.reference import imaml as ref

LR, K, LAM = 0.1, 3, 4.0


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def exact(model, xs, ys, xq, yq, loss):
    return ref.imaml_grad(pure(model), dict(model.named_parameters()), xs, ys, xq, yq, inner_lr=LR,
                          inner_steps=K, lam=LAM, loss=loss)


CASES = [  # (model, batch, loss, task_map, hvp, expected path)
    ("mlp-fused", mlp, regression_batch, "mse", "auto", "auto", "fused_mlp_hvp"),
    ("mlp-relu-ce-fused", lambda: mlp(nn.ReLU), None, "cross_entropy", "auto", "auto", "fused_mlp_hvp"),
    ("mlp-vmap-autograd", mlp, regression_batch, "mse", "vmap", "autograd", "generic"),
    ("mlp-loop-fwd_rev", mlp, regression_batch, "mse", "loop", "fwd_rev", "generic"),
]


def _ce_batch():
    xs, _, xq, _ = regression_batch()
    g = torch.Generator().manual_seed(3)
    return xs, torch.randint(0, 2, xs.shape[:2], generator=g), xq, torch.randint(0, 2, xq.shape[:2], generator=g)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_exact_implicit_gradient(case):
    _, make, batch, loss, tm, hv, path = case
    model = make()
    xs, ys, xq, yq = batch() if batch is not None else _ce_batch()
    im = iMAML(model, inner_lr=LR, inner_steps=K, lam=LAM, cg_steps=n_params(model) + 20, loss=loss)
    im.task_map, im.hvp = tm, hv
    out = im(xs, ys, xq, yq)
    out.backward()
    assert im.path == path
    val, g_ref = exact(model, xs, ys, xq, yq, loss)
    assert abs(float(out.detach()) - float(val)) < 1e-12
    scale = max(1.0, max(float(g.abs().max()) for g in g_ref.values()))
    assert max_err(grads_of(model), g_ref) <= 1e-8 * scale
    assert bool(im.last_cg["cg_converged"].all())
    assert float(im.last_cg["cg_residuals"].max()) <= 1e-10


def test_conv_bn_matches_exact_implicit_gradient():
    """A conv net with batch-statistics BatchNorm: every generic flavour (the CPU
    default: loop with fused BatchNorm and kept-graph HVPs; vmap with autograd or
    forward-over-reverse HVPs) against one explicit-Hessian solve."""
    model = conv_bn()
    xs, ys, xq, yq = image_batch(T=2, ns=5, nq=4)
    val, g_ref = exact(model, xs, ys, xq, yq, "cross_entropy")
    scale = max(1.0, max(float(g.abs().max()) for g in g_ref.values()))
    im = iMAML(model, inner_lr=LR, inner_steps=K, lam=LAM, cg_steps=n_params(model) + 20, loss="cross_entropy")
    for tm, hv, why in (("auto", "auto", "loop over tasks, autograd HVPs"), ("vmap", "fwd_rev", "jvp(grad)"),
                        ("vmap", "autograd", "vmap over tasks, autograd")):
        zero_grads(model)
        im.task_map, im.hvp = tm, hv
        out = im(xs, ys, xq, yq)
        out.backward()
        assert im.path == "generic" and why in im.path_reason
        assert abs(float(out.detach()) - float(val)) < 1e-12
        assert max_err(grads_of(model), g_ref) <= 1e-8 * scale, (tm, hv)
        assert bool(im.last_cg["cg_converged"].all())


def test_fused_hvp_kernel_is_used_and_agrees_with_generic(monkeypatch):
    model = mlp()
    xs, ys, xq, yq = regression_batch(T=4)
    calls = []
    real = fastmaml.ops.mlp_hvp

    def counting(*a, **kw):
        calls.append(a[0][0].shape[0])
        return real(*a, **kw)

    monkeypatch.setattr(fastmaml.ops, "mlp_hvp", counting)
    im = iMAML(model, inner_lr=LR, inner_steps=K, lam=LAM, cg_steps=6, cg_tol=0.0)
    im(xs, ys, xq, yq).backward()
    fused = grads_of(model)
    assert im.path == "fused_mlp_hvp"
    # one kernel call per CG iteration, all 4 tasks in it (lockstep, no loop over tasks)
    assert calls == [4] * 6 and im.last_cg["cg_iterations"] == 6
    calls.clear()
    zero_grads(model)
    im.task_map, im.hvp = "vmap", "autograd"
    im(xs, ys, xq, yq).backward()
    assert im.path == "generic" and calls == []
    assert max_err(fused, grads_of(model)) < 1e-11


def test_cg_error_in_a_norm_decreases_monotonically():
    """Lockstep CG with the fused HVP as matvec; the A-norm error of every task's iterate
    against the exact solve (explicit Hessian) never increases, and reaches ~0."""
    model = mlp()
    xs, ys, xq, yq = regression_batch(T=3)
    params = dict(model.named_parameters())
    phi = fastmaml.family.imaml_adapt(model, params, xs, ys, inner_lr=LR, inner_steps=K, lam=LAM)
    tasks = MlpTasks([3, 6, 2], "tanh", "mse", None)
    phi_l = list(phi.values())
    _, b = tasks.grads(phi_l, xq, yq)
    hvp = tasks.hvp_at(phi_l, xs, ys)
    A, xstar = [], []
    for t in range(3):
        def f(v, t=t):
            ps, i = {}, 0
            for n, p in phi.items():
                ps[n] = v[i:i + p[t].numel()].view_as(p[t])
                i += p[t].numel()
            return ((torch.func.functional_call(model, ps, (xs[t],)) - ys[t]) ** 2).mean()
        H = torch.autograd.functional.hessian(f, torch.cat([p[t].reshape(-1) for p in phi_l]))
        A.append(torch.eye(H.shape[0], dtype=H.dtype) + H / LAM)
        xstar.append(torch.linalg.solve(A[-1], torch.cat([bi[t].reshape(-1) for bi in b])))
    errs = []

    def cb(i, x):
        row = []
        for t in range(3):
            e = torch.cat([xi[t].reshape(-1) for xi in x]) - xstar[t]
            row.append(float(e @ A[t] @ e) ** 0.5)
        errs.append(row)

    n = n_params(model)
    batched_cg(lambda p: [pi + hi / LAM for pi, hi in zip(p, hvp(p))], b, steps=n, tol=0.0, callback=cb)
    e0 = [float((xstar[t] @ A[t] @ xstar[t]) ** 0.5) for t in range(3)]
    assert len(errs) >= 5
    for t in range(3):
        seq = [e0[t]] + [r[t] for r in errs]
        assert all(b_ <= a_ * (1 + 1e-9) + 1e-14 for a_, b_ in zip(seq, seq[1:])), seq
        assert seq[-1] < 1e-9 * e0[t]


def test_cg_masks_converged_tasks():
    """Task 0's matrix is 2·I (CG converges in one step); task 1's has 4 distinct
    eigenvalues. Task 0's iterate is frozen after its convergence; both are exact."""
    d = torch.tensor([[2.0, 2.0, 2.0, 2.0], [1.0, 3.0, 7.0, 20.0]], dtype=torch.float64)
    b = [torch.tensor([[1.0, -2.0, 3.0, 0.5], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)]
    seen = []
    x, info = batched_cg(lambda p: [d * p[0]], b, steps=10, tol=1e-12, callback=lambda i, x: seen.append(x[0].clone()))
    assert torch.allclose(x[0], b[0] / d, atol=1e-12, rtol=0)
    assert info.iterations == 4 and bool(info.converged.all())
    assert all(torch.equal(s[0], seen[0][0]) for s in seen)  # task 0 masked after iteration 1


def test_cg_rejects_indefinite_matrix_and_zero_rhs():
    with pytest.raises(RuntimeError, match="not positive definite"):
        batched_cg(lambda p: [torch.tensor([[1.0, -1.0]]) * p[0]], [torch.ones(1, 2)], steps=5, tol=0.0)
    x, info = batched_cg(lambda p: p, [torch.zeros(2, 3)], steps=5, tol=1e-10)
    assert info.iterations == 0 and torch.equal(x[0], torch.zeros(2, 3))
    # truncate: task 0 (indefinite) stops at its last iterate (0 here), task 1 is solved
    d = torch.tensor([[1.0, -1.0], [2.0, 4.0]], dtype=torch.float64)
    x, info = batched_cg(lambda p: [d * p[0]], [torch.ones(2, 2, dtype=torch.float64)], steps=5, tol=1e-12,
                         indefinite="truncate")
    assert info.indefinite.tolist() == [True, False] and info.converged.tolist() == [False, True]
    assert torch.equal(x[0][0], torch.zeros(2, dtype=torch.float64))
    assert torch.allclose(x[0][1], torch.tensor([0.5, 0.25], dtype=torch.float64), atol=1e-14, rtol=0)
    with pytest.raises(ValueError, match="indefinite"):
        batched_cg(lambda p: p, [torch.ones(1, 2)], steps=1, tol=0.0, indefinite="ignore")


def test_reference_backend_functional_form_adapt_predict():
    model = mlp()
    xs, ys, xq, yq = regression_batch()
    params = dict(model.named_parameters())
    info: dict = {}
    out = imaml_loss(pure(model), params, xs, ys, xq, yq, inner_lr=LR, inner_steps=K, lam=LAM, cg_steps=200,
                     info=info)
    g = torch.autograd.grad(out, list(params.values()))
    im_ref = iMAML(model, inner_lr=LR, inner_steps=K, lam=LAM, cg_steps=1, backend="reference")
    g2 = torch.autograd.grad(im_ref(xs, ys, xq, yq), list(params.values()))
    assert info["path"] == "generic" and im_ref.path == "reference"
    assert max(float((a - b).abs().max()) for a, b in zip(g, g2)) < 1e-10
    model = conv_bn()
    xs, ys, xq, yq = image_batch()
    im_ref = iMAML(model, inner_lr=LR, inner_steps=K, lam=LAM, cg_steps=1, loss="cross_entropy", backend="reference")
    im = iMAML(model, inner_lr=LR, inner_steps=K, lam=LAM, cg_steps=5, loss="cross_entropy")
    fast, fast_ref = im.adapt(xs, ys, steps=4), im_ref.adapt(xs, ys, steps=4)
    assert max_err(fast, fast_ref) < 1e-12 and fast["0.weight"].shape == (3, 2, 1, 3, 3)
    pred = im.predict(fast, xq)
    assert pred.shape == (3, 5, 3)
    assert torch.allclose(pred[1], torch.func.functional_call(model, {n: p[1] for n, p in fast.items()}, (xq[1],)))


def test_double_backward_raises_and_inplace_edit_detected():
    model = mlp()
    xs, ys, xq, yq = regression_batch()
    im = iMAML(model, inner_lr=LR, inner_steps=K, lam=LAM, cg_steps=3)
    gs = torch.autograd.grad(im(xs, ys, xq, yq), list(model.parameters()), create_graph=True)
    with pytest.raises(RuntimeError, match="once-differentiable"):
        sum(g.sum() for g in gs).backward()
    out = im(xs, ys, xq, yq)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    with pytest.raises(RuntimeError):
        out.backward()


@pytest.mark.parametrize("kw,match", [
    (dict(lam=0.0), "lam"), (dict(lam=float("nan")), "lam"), (dict(inner_lr=-1.0), "inner_lr"),
    (dict(cg_steps=0), "cg_steps"), (dict(inner_steps=0), "inner_steps"), (dict(cg_tol=-1.0), "cg_tol"),
    (dict(backend="gpu"), "backend"), (dict(cg_indefinite="ignore"), "cg_indefinite"),
])
def test_bad_arguments(kw, match):
    args = dict(inner_lr=LR, inner_steps=K, lam=LAM, cg_steps=3)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        iMAML(mlp(), **args)


def test_bad_models_and_data():
    xs, ys, xq, yq = image_batch()
    bn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 3)).double()
    with pytest.raises(ValueError, match="running statistics"):
        iMAML(bn, cg_steps=2, loss="cross_entropy")(xs, ys, xq, yq)
    psbn = nn.Sequential(nn.Conv2d(1, 2, 3), fastmaml.nn.PerStepBatchNorm2d(2, steps=3), nn.Flatten(),
                         nn.Linear(8, 3)).double()
    with pytest.raises(ValueError, match="PerStepBatchNorm2d"):
        iMAML(psbn, cg_steps=2, loss="cross_entropy")(xs, ys, xq, yq)
    with pytest.raises(TypeError, match="float64"):
        iMAML(mlp(), cg_steps=2)(*(t.float() for t in regression_batch()))
    with pytest.raises(TypeError, match="model"):
        iMAML("net", cg_steps=2)  # type: ignore[arg-type]
