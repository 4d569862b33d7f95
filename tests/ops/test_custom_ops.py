"""The ``torch.library`` custom ops (``torch.ops.fastmaml.*``): registered on import,
``opcheck`` (schema, autograd registration, fake tensors, AOT dispatch) on
representative inputs, and the same numbers as the eager functions."""

from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

import fastmaml
from fastmaml import codes

F64 = torch.float64
CHECKS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _ok(result: dict) -> None:
    assert {k: result[k] for k in CHECKS} == {k: "SUCCESS" for k in CHECKS}


def test_ops_registered_on_import():
    for name in ("sgd_step", "sgd_step_backward", "maml_mlp", "maml_mlp_backward", "mlp_loss_and_grad", "mlp_hvp",
                 "batch_norm",
                 "batch_norm_backward", "batch_norm_double_backward"):
        assert hasattr(torch.ops.fastmaml, name), name
    assert fastmaml.ops.sgd_step is not None


def _sgd_inputs(kind: int, T: int = 3):
    torch.manual_seed(0)
    ps = [torch.randn(4, 5, dtype=F64, requires_grad=True), torch.randn(T, 5, dtype=F64, requires_grad=True)]
    gs = [torch.randn(T, 4, 5, dtype=F64, requires_grad=True), torch.randn(T, 5, dtype=F64, requires_grad=True)]
    if kind == codes.SGD_LR_FLOAT:
        return ps, gs, [], 0.1
    if kind == codes.SGD_LR_SCALAR:
        return ps, gs, [torch.tensor(0.1, dtype=F64, requires_grad=True)], 0.0
    if kind == codes.SGD_LR_PER_TENSOR:
        return ps, gs, [torch.rand(2, dtype=F64, requires_grad=True)], 0.0
    return ps, gs, [torch.rand(4, 5, dtype=F64, requires_grad=True), torch.rand(5, dtype=F64, requires_grad=True)], 0.0


KINDS = (codes.SGD_LR_FLOAT, codes.SGD_LR_SCALAR, codes.SGD_LR_PER_TENSOR, codes.SGD_LR_PER_ELEMENT)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("kind", KINDS)
def test_sgd_step_opcheck(backend, kind):
    ps, gs, lrs, val = _sgd_inputs(kind)
    _ok(opcheck(torch.ops.fastmaml.sgd_step.default, (ps, gs, lrs, kind, val, backend)))
    v = [torch.randn_like(g) for g in gs]
    args = (v, [g.detach() for g in gs], [a.detach() for a in lrs], [1, 0], kind, val, True, backend)
    _ok(opcheck(torch.ops.fastmaml.sgd_step_backward.default, args))
    # the op's numbers are the eager function's; its registered autograd is exact
    lr = val if kind == codes.SGD_LR_FLOAT else (lrs if kind == codes.SGD_LR_PER_ELEMENT else lrs[0])
    eager = fastmaml.ops.sgd_step(ps, gs, lr, backend=backend)
    for a, b in zip(torch.ops.fastmaml.sgd_step(ps, gs, lrs, kind, val, backend), eager):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)
    fn = lambda *a: torch.ops.fastmaml.sgd_step(list(a[:2]), list(a[2:4]), list(a[4:]), kind, val, backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (*ps, *gs, *lrs))
    assert torch.autograd.gradgradcheck(fn, (*ps, *gs, *lrs))


def _mlp_inputs(loss: str, lr_kind: str, dims=(2, 8, 8, 3), T=2, Ns=4, Nq=3, K=2):
    torch.manual_seed(1)
    ws = [(0.5 * torch.randn(dims[i + 1], dims[i], dtype=F64)).requires_grad_() for i in range(len(dims) - 1)]
    bs = [(0.1 * torch.randn(dims[i + 1], dtype=F64)).requires_grad_() for i in range(len(dims) - 1)]
    xs, xq = torch.randn(T, Ns, dims[0], dtype=F64), torch.randn(T, Nq, dims[0], dtype=F64)
    if loss == "mse":
        ys, yq = torch.randn(T, Ns, dims[-1], dtype=F64), torch.randn(T, Nq, dims[-1], dtype=F64)
    else:
        ys, yq = torch.randint(0, dims[-1], (T, Ns)), torch.randint(0, dims[-1], (T, Nq))
    n = 2 * len(ws)
    lrs = {"float": [], "scalar": [torch.tensor(0.05, dtype=F64, requires_grad=True)],
           "table": [torch.full((K, n), 0.05, dtype=F64, requires_grad=True)],
           "elem": [torch.full(p.shape, 0.05, dtype=F64, requires_grad=True)
                    for pair in zip(ws, bs) for p in pair]}[lr_kind]
    msl = torch.tensor([0.3, 0.7], dtype=F64)
    return ws, bs, xs, ys, xq, yq, lrs, msl, K


@pytest.mark.parametrize("path", ["fused", "layerwise"])
@pytest.mark.parametrize("loss,lr_kind", [("mse", "float"), ("mse", "table"), ("cross_entropy", "scalar"),
                                          ("mse", "elem")])
def test_maml_mlp_opcheck(path, loss, lr_kind, monkeypatch):
    from fastmaml.ops import maml_mlp_fit

    backend = "cpu"
    if path == "layerwise":  # a workspace limit of 0 bytes: the cpu backend's layer-wise path
        monkeypatch.setattr(maml_mlp_fit, "FUSED_CPU_MAX_WORKSPACE_BYTES", 0)
    ws, bs, xs, ys, xq, yq, lrs, msl, K = _mlp_inputs(loss, lr_kind)
    args = (ws, bs, xs, ys, xq, yq, lrs, msl, K, False, "tanh", loss, lr_kind, 0.05 if lr_kind == "float" else 0.0,
            True, bool(lrs), backend, True, msl.tolist() if lr_kind in ("float", "table") else None)
    _ok(opcheck(torch.ops.fastmaml.maml_mlp.default, args))
    out, grads, dlr = torch.ops.fastmaml.maml_mlp(*args)
    lr = 0.05 if lr_kind == "float" else (lrs if lr_kind == "elem" else lrs[0])
    eager = fastmaml.ops.maml_mlp(ws, bs, xs, ys, xq, yq, lr, steps=K, activation="tanh", loss=loss,
                                  msl_weights=msl, backend=backend)
    torch.testing.assert_close(out, eager, rtol=0, atol=1e-12)
    ge = torch.autograd.grad(eager, [*ws, *bs, *lrs])
    go = torch.autograd.grad(out, [*ws, *bs, *lrs])
    for a, b in zip(go, ge):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("lr_kind", ["none", "scalar", "table", "elem", "elem_step", "elem_mixed"])
def test_maml_mlp_backward_opcheck(lr_kind):
    """fastmaml::maml_mlp's backward op: the stored meta-gradient times d(loss), the flat lr
    gradient times d(loss) in the lr tensors' shapes (a shared rate of a per-step packing
    summed over the steps); new tensors; a second derivative refused."""
    torch.manual_seed(4)
    K, shapes = 3, [(4, 3), (4,), (2, 4), (2,)]
    grads = [torch.randn(s, dtype=F64) for s in shapes]
    g = torch.tensor(0.75, dtype=F64)
    P = sum(torch.Size(s).numel() for s in shapes)
    per_step = {"elem_step": [True] * 4, "elem_mixed": [True, False, False, True]}.get(lr_kind, [False] * 4)
    dlr = {"none": [], "scalar": [torch.randn(1, dtype=F64)], "table": [torch.randn(K * 4, dtype=F64)],
           "elem": [torch.randn(P, dtype=F64)]}.get(lr_kind, [torch.randn(K * P, dtype=F64)])
    kind = "elem" if lr_kind.startswith("elem") else ("float" if lr_kind == "none" else lr_kind)
    args = (grads, dlr, g, kind, K, per_step if kind == "elem" else [])
    _ok(opcheck(torch.ops.fastmaml.maml_mlp_backward.default, args))
    out_g, out_lr = torch.ops.fastmaml.maml_mlp_backward(*args)
    for a, b in zip(out_g, grads, strict=True):
        assert a.data_ptr() != b.data_ptr()
        torch.testing.assert_close(a, b * g, rtol=0, atol=0)
    if lr_kind == "none":
        assert out_lr == []
    elif lr_kind == "scalar":
        torch.testing.assert_close(out_lr[0], (dlr[0][0] * g).reshape(()), rtol=0, atol=0)
    elif lr_kind == "table":
        torch.testing.assert_close(out_lr[0], (dlr[0] * g).view(K, 4), rtol=0, atol=0)
    else:
        flat = dlr[0].view(K, -1) if lr_kind != "elem" else dlr[0]
        off = 0
        for a, s, st in zip(out_lr, shapes, per_step, strict=True):
            n = torch.Size(s).numel()
            want = (flat[off:off + n].view(s) if lr_kind == "elem" else
                    flat[:, off:off + n].reshape(K, *s) if st else flat[:, off:off + n].reshape(K, *s).sum(0)) * g
            torch.testing.assert_close(a, want, rtol=0, atol=0)
            off += n
    gr = [t.clone().requires_grad_() for t in grads]
    with pytest.raises(RuntimeError, match="once-differentiable"):
        torch.autograd.grad(torch.ops.fastmaml.maml_mlp_backward(gr, [], g, "float", K, [])[0][0].sum(), gr)


def test_maml_mlp_op_default_msl_built_inside():
    """msl None: the op builds the default last-step weights itself (a compiled graph
    then holds no kernel for them); same numbers as passing them."""
    ws, bs, xs, ys, xq, yq, lrs, _, K = _mlp_inputs("mse", "float")
    last = [0.0] * (K - 1) + [1.0]
    args = [ws, bs, xs, ys, xq, yq, lrs, torch.tensor(last, dtype=F64), K, False, "tanh", "mse", "float", 0.05,
            True, False, "cpu", True, last]
    want = torch.ops.fastmaml.maml_mlp(*args)
    args[7] = None
    got = torch.ops.fastmaml.maml_mlp(*args)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    for a, b in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_maml_mlp_op_checks_finiteness_and_labels():
    ws, bs, xs, ys, xq, yq, lrs, msl, K = _mlp_inputs("cross_entropy", "float")
    xs = xs.clone()
    xs[0, 0, 0] = float("nan")
    args = [ws, bs, xs, ys, xq, yq, lrs, msl, K, False, "relu", "cross_entropy", "float", 0.05, True, False, "cpu",
            True, None]
    with pytest.raises(ValueError, match="xs"):
        torch.ops.fastmaml.maml_mlp(*args)
    args[2] = xq.new_zeros(xs.shape)
    args[5] = yq + 3
    with pytest.raises(ValueError, match="yq holds labels outside"):
        torch.ops.fastmaml.maml_mlp(*args)
    args[5] = yq
    args[16] = "reference"
    with pytest.raises(ValueError, match="reference"):
        torch.ops.fastmaml.maml_mlp(*args)


def _per_task_mlp(loss: str, dims=(3, 6, 4), T=2, N=5):
    torch.manual_seed(2)
    ws = [0.5 * torch.randn(T, dims[i + 1], dims[i], dtype=F64) for i in range(len(dims) - 1)]
    bs = [0.1 * torch.randn(T, dims[i + 1], dtype=F64) for i in range(len(dims) - 1)]
    x = torch.randn(T, N, dims[0], dtype=F64)
    y = torch.randn(T, N, dims[-1], dtype=F64) if loss == "mse" else torch.randint(0, dims[-1], (T, N))
    vw, vb = [torch.randn_like(w) for w in ws], [torch.randn_like(b) for b in bs]
    return ws, bs, x, y, vw, vb


@pytest.mark.parametrize("loss,activation", [("mse", "tanh"), ("cross_entropy", "relu")])
def test_mlp_ops_opcheck_and_equal_eager(loss, activation):
    ws, bs, x, y, vw, vb = _per_task_mlp(loss)
    _ok(opcheck(torch.ops.fastmaml.mlp_loss_and_grad.default, (ws, bs, x, y, activation, loss, "cpu")))
    _ok(opcheck(torch.ops.fastmaml.mlp_hvp.default, (ws, bs, x, y, vw, vb, activation, loss, "cpu")))
    lt, gw, gb = torch.ops.fastmaml.mlp_loss_and_grad(ws, bs, x, y, activation, loss, "cpu")
    rl, rw, rb = fastmaml.reference.mlp_loss_and_grad(ws, bs, x, y, activation=activation, loss=loss)
    for a, b in zip([lt, *gw, *gb], [rl, *rw, *rb]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    hw, hb = torch.ops.fastmaml.mlp_hvp(ws, bs, x, y, vw, vb, activation, loss, "cpu")
    ew, eb = fastmaml.ops.mlp_hvp(ws, bs, x, y, vw, vb, activation=activation, loss=loss, backend="cpu")
    for a, b in zip([*hw, *hb], [*ew, *eb]):
        assert torch.equal(a, b)  # the same kernel: bitwise


def test_mlp_ops_refuse_reference_and_bad_labels_inside_the_op():
    ws, bs, x, y, vw, vb = _per_task_mlp("cross_entropy")
    with pytest.raises(ValueError, match="reference"):
        torch.ops.fastmaml.mlp_loss_and_grad(ws, bs, x, y, "relu", "cross_entropy", "reference")
    with pytest.raises(ValueError, match=r"y holds labels outside \[0, 4\): min 0, max 7"):
        torch.ops.fastmaml.mlp_hvp(ws, bs, x, y.clamp(0, 3).index_fill(1, torch.tensor([0]), 7), vw, vb, "relu",
                                   "cross_entropy", "cpu")


def test_mlp_ops_compile_fullgraph_equal_eager():
    ws, bs, x, y, vw, vb = _per_task_mlp("cross_entropy")
    torch._dynamo.reset()

    def f(ws, bs, x, y, vw, vb):
        lt, gw, gb = fastmaml.ops.mlp_loss_and_grad(ws, bs, x, y, loss="cross_entropy", backend="cpu")
        hw, hb = fastmaml.ops.mlp_hvp(ws, bs, x, y, vw, vb, loss="cross_entropy", backend="cpu")
        return lt, gw, gb, hw, hb

    explained = torch._dynamo.explain(f)(ws, bs, x, y, vw, vb)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    out = torch.compile(f, fullgraph=True)(ws, bs, x, y, vw, vb)
    for a, b in zip(torch.utils._pytree.tree_leaves(out), torch.utils._pytree.tree_leaves(f(ws, bs, x, y, vw, vb))):
        assert torch.equal(a, b)
    # the label check stays on in the compiled graph (inside the op)
    with pytest.raises(ValueError, match="y holds labels outside"):
        torch.compile(f, fullgraph=True)(ws, bs, x, y + 4, vw, vb)


def _bn_inputs(shape=(4, 3, 2, 2)):
    torch.manual_seed(3)
    x = torch.randn(*shape, dtype=F64, requires_grad=True)
    w = (1 + 0.2 * torch.randn(shape[1], dtype=F64)).requires_grad_()
    b = (0.1 * torch.randn(shape[1], dtype=F64)).requires_grad_()
    return x, w, b


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_batch_norm_ops_opcheck(backend):
    x, w, b = _bn_inputs()
    _ok(opcheck(torch.ops.fastmaml.batch_norm.default, (x, w, b, 1e-5, backend)))
    y, mean, rstd = torch.ops.fastmaml.batch_norm(x.detach(), w.detach(), b.detach(), 1e-5, backend)
    gy = torch.randn_like(x).requires_grad_()
    xd = x.detach().requires_grad_()
    _ok(opcheck(torch.ops.fastmaml.batch_norm_backward.default, (gy, xd, w, mean, rstd, backend)))
    a, bw, bb = torch.randn_like(x), torch.randn_like(w), torch.randn_like(b)
    _ok(opcheck(torch.ops.fastmaml.batch_norm_double_backward.default,
                (a, bw, bb, gy.detach(), x.detach(), w.detach(), mean, rstd, backend)))
    _ok(opcheck(torch.ops.fastmaml.batch_norm_double_backward.default,
                (None, bw, None, gy.detach(), x.detach(), w.detach(), mean, rstd, backend)))
    # the ops are the eager function's numbers and differentiate twice (the closed forms)
    fn = lambda x, w, b: torch.ops.fastmaml.batch_norm(x, w, b, 1e-5, backend)[0]  # noqa: E731
    torch.testing.assert_close(fn(x, w, b), fastmaml.ops.batch_norm(x, w, b, backend=backend), rtol=0, atol=1e-13)
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_batch_norm_ops_refuse_what_they_cannot_differentiate():
    x, w, b = _bn_inputs()
    y, mean, rstd = torch.ops.fastmaml.batch_norm(x, w, b, 1e-5, "cpu")
    assert not mean.requires_grad and not rstd.requires_grad  # batch statistics: non-differentiable outputs
    gy = torch.randn_like(x)
    (dx,) = torch.autograd.grad(y, x, gy, create_graph=True)
    (ddx,) = torch.autograd.grad(dx.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="not differentiable again"):
        ddx.sum().backward()
    out = torch.ops.fastmaml.batch_norm_backward(gy, x, w, mean.detach().requires_grad_(), rstd, "cpu")
    with pytest.raises(RuntimeError, match="mean and rstd are x's batch statistics"):
        out[0].sum().backward()
    with pytest.raises(ValueError, match="backend must be one of"):
        torch.ops.fastmaml.batch_norm(x, w, b, 1e-5, "cuda")
