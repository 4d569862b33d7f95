"""The public API: fastmaml.MAML and fastmaml.maml_loss — agreement with the reference
path, learned learning rates, adapt/predict, path reporting, and clear errors."""

from __future__ import annotations

import pytest
import torch
from tests.maml.cases import F64, assert_close, conv_bn_net, meta_batch, one_thread
from torch import nn

import fastmaml

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2)).double()


def _grads(maml):
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in maml.named_parameters()}


@pytest.mark.parametrize("lr_mode", ["scalar", "per_step_layer", "per_element", "per_step_element"])
@pytest.mark.parametrize("first_order", [False, True])
def test_module_matches_reference_backend_and_trains_lrs(lr_mode, first_order):
    data = meta_batch(3, 5, 4, 3, 2)
    out = []
    for backend in ("reference", "auto"):
        m = fastmaml.MAML(_mlp(), inner_lr=0.1, inner_steps=2, first_order=first_order, lr_mode=lr_mode,
                          learn_lr=True, msl_weights=[0.5, 1.0], backend=backend)
        L = m(*data)
        L.backward()
        out.append((L.detach(), _grads(m), m))
    (l0, g0, m0), (l1, g1, m1) = out
    assert m0.path == "reference" and m1.path == "generic" and "vmap" in m1.path_reason
    assert_close("meta-loss", l1, l0, 1e-10)
    assert set(g0) == set(g1)
    for n in g0:
        assert g1[n] is not None, f"{n} got no gradient"
        assert_close(f"d/d{n}", g1[n], g0[n], 1e-10)
    assert any(n.startswith("lrs.") for n in g1)
    # any optimizer trains the learned rates
    lr_before = [p.detach().clone() for p in m1.lrs]
    torch.optim.SGD(m1.parameters(), lr=0.1).step()
    assert any(not torch.equal(a, b.detach()) for a, b in zip(lr_before, m1.lrs))


def test_module_anil_cross_entropy_conv_bn_loop_path():
    torch.manual_seed(0)
    model = conv_bn_net(True, ch=2, classes=3).double()
    names = [n for n, _ in model.named_parameters()]
    xs = torch.randn(2, 3, 1, 8, 8, dtype=F64)
    xq = torch.randn(2, 4, 1, 8, 8, dtype=F64)
    ys = torch.randint(0, 3, (2, 3))
    yq = torch.randint(0, 3, (2, 4))
    res = []
    for backend in ("reference", "auto"):
        model.zero_grad()
        m = fastmaml.MAML(model, inner_lr=0.05, inner_steps=2, loss="cross_entropy", adapt=names[-2:], backend=backend)
        L = m(xs, ys, xq, yq)
        L.backward()
        res.append((L.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, m))
    assert "loop" in res[1][2].path_reason
    assert_close("meta-loss", res[1][0], res[0][0], 1e-10)
    for n in names:
        assert_close(f"d/d{n}", res[1][1][n], res[0][1][n], 1e-10)


def test_adapt_and_predict():
    m = fastmaml.MAML(_mlp(), inner_lr=0.1, inner_steps=3)
    xs, ys, xq, yq = meta_batch(2, 5, 4, 3, 2)
    fast = m.adapt(xs, ys, steps=4)
    want = fastmaml.reference.maml_adapt(lambda p, x: torch.func.functional_call(m.model, p, (x,)),
                                         dict(m.model.named_parameters()), 0.1, xs, ys, steps=4)
    for n in want:
        assert_close(f"fast[{n}]", fast[n], want[n], 1e-12)
    pred = m.predict(fast, xq)
    assert pred.shape == (2, 4, 2)
    for t in range(2):
        p_t = {n: v[t] for n, v in want.items()}
        assert_close("pred", pred[t], torch.func.functional_call(m.model, p_t, (xq[t],)), 1e-12)
    # adaptation lowers the support loss
    loss0 = ((torch.func.vmap(lambda x: m.model(x))(xs) - ys) ** 2).mean()
    loss1 = ((m.predict(fast, xs) - ys) ** 2).mean()
    assert loss1 < loss0


def test_functional_maml_loss_reference_and_fast_agree():
    model = _mlp()
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    lr = torch.full((2, len(params)), 0.1, dtype=F64, requires_grad=True)
    data = meta_batch(2, 5, 4, 3, 2)

    def fn(p, x):
        return torch.func.functional_call(model, p, (x,))

    res = []
    for backend in ("reference", "auto"):
        L = fastmaml.maml_loss(fn, params, lr, *data, steps=2, backend=backend)
        res.append((L.detach(), torch.autograd.grad(L, list(params.values()) + [lr])))
    assert_close("meta-loss", res[1][0], res[0][0], 1e-10)
    for a, b in zip(res[1][1], res[0][1]):
        assert_close("grad", a, b, 1e-10)


def test_meta_step_leaves_user_tensors_and_params_unchanged():
    m = fastmaml.MAML(_mlp(), inner_lr=0.1, inner_steps=2, lr_mode="per_element", learn_lr=True)
    data = meta_batch(2, 5, 4, 3, 2)
    copies = [d.clone() for d in data]
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    m(*data).backward()
    m.adapt(data[0], data[1])
    for a, b in zip(data, copies):
        assert torch.equal(a, b)
    for n, p in m.named_parameters():
        assert torch.equal(p.detach(), before[n]), n


def test_double_backward_error_mentions_once_differentiable():
    m = fastmaml.MAML(_mlp(), inner_steps=2)
    L = m(*meta_batch(2, 5, 4, 3, 2))
    g = torch.autograd.grad(L, list(m.model.parameters()), create_graph=True)
    with pytest.raises(RuntimeError, match="once-differentiable"):
        torch.autograd.grad(sum(x.sum() for x in g), list(m.model.parameters()))


# --- bad input ---------------------------------------------------------------------------
def _good():
    return meta_batch(2, 5, 4, 3, 2)


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda d: (d[0][:1], d[1], d[2], d[3]), ValueError, "ys must hold T = 1"),
        (lambda d: (d[0], d[1], d[2][:1], d[3][:1]), ValueError, "xq must hold T = 2"),
        (lambda d: (d[0][:0], d[1][:0], d[2][:0], d[3][:0]), ValueError, "T = 0"),
        (lambda d: (d[0], d[1][:, :3], d[2], d[3]), ValueError, "as many support points"),
        (lambda d: (d[0].float(), d[1], d[2], d[3]), TypeError, "xs must have dtype"),
        (lambda d: (d[0].long(), d[1], d[2], d[3]), TypeError, "xs must be float32 or float64"),
        (lambda d: (d[0], d[1], d[2], d[3].clone().fill_(float("nan"))), ValueError, "yq contains NaN"),
        (lambda d: (d[0].clone().fill_(float("inf")), d[1], d[2], d[3]), ValueError, "xs contains NaN or Inf"),
        (lambda d: (d[0], d[1], d[2][..., :2], d[3]), ValueError, "same point shape"),
        (lambda d: (d[0][0, 0], d[1], d[2], d[3]), ValueError, r"xs must be \[T, N"),
        (lambda d: (d[0].tolist(), d[1], d[2], d[3]), TypeError, "xs must be a torch.Tensor"),
    ],
)
def test_bad_meta_batches_raise_clearly(mutate, exc, match):
    for backend in ("auto", "reference"):
        m = fastmaml.MAML(_mlp(), inner_steps=1, backend=backend)
        with pytest.raises(exc, match=match):
            m(*mutate(_good()))


def test_cross_entropy_label_dtype_checked():
    m = fastmaml.MAML(_mlp(), inner_steps=1, loss="cross_entropy")
    xs, ys, xq, yq = _good()
    with pytest.raises(TypeError, match="int64 class labels"):
        m(xs, ys, xq, yq)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(lr_mode="per_layer"), ValueError, "lr_mode must be one of"),
        (dict(loss="l1"), ValueError, "loss must be one of"),
        (dict(loss=3), TypeError, "loss must be one of"),
        (dict(inner_steps=0), ValueError, "inner_steps must be >= 1"),
        (dict(inner_lr=float("nan")), ValueError, "inner_lr must be a finite"),
        (dict(adapt=["nope"]), ValueError, "adapt names unknown"),
        (dict(msl_weights=[1.0]), ValueError, "one weight per inner step"),
        (dict(backend="gpu"), ValueError, "backend must be one of"),
        (dict(first_order=1), TypeError, "first_order must be a bool"),
    ],
)
def test_bad_constructor_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fastmaml.MAML(_mlp(), **{"inner_steps": 2, **kwargs})


def test_unsupported_models_raise_with_advice():
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()
    with pytest.raises(ValueError, match="track_running_stats=False"):
        fastmaml.MAML(bn)
    bn.eval()  # fixed running statistics: a pure function of the parameters
    m = fastmaml.MAML(bn, inner_steps=1)
    m(*_good()).backward()
    bn.train()
    with pytest.raises(ValueError, match="track_running_stats=False"):
        m(*_good())
    drop = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)).double()
    with pytest.raises(ValueError, match="Dropout"):
        fastmaml.MAML(drop)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fastmaml.MAML(lambda x: x)


class _Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2).double()
        self.register_buffer("calls", torch.zeros((), dtype=F64))

    def forward(self, x):
        self.calls.add_(1)  # mutates a buffer: not a function of the parameters
        return self.lin(x)


def test_buffer_mutation_is_detected():
    m = fastmaml.MAML(_Counter(), inner_steps=1, backend="reference")
    with pytest.raises(RuntimeError, match="modified one of its buffers"):
        m(*_good())


def test_adapt_steps_with_per_step_rates():
    m = fastmaml.MAML(_mlp(), inner_steps=2, lr_mode="per_step_layer")
    with pytest.raises(ValueError, match="defines rates for 2 steps"):
        m.adapt(*_good()[:2], steps=3)
    assert m.adapt(*_good()[:2])["0.weight"].shape == (2, 8, 3)


def test_functional_bad_lrs():
    params = dict(_mlp().named_parameters())
    data = _good()
    fn = lambda p, x: x  # noqa: E731
    with pytest.raises(ValueError, match=r"\[K, n_adapted\]"):
        fastmaml.maml_loss(fn, params, torch.zeros(3, 3, dtype=F64), *data, steps=2)
    with pytest.raises(ValueError, match="one tensor per adapted tensor"):
        fastmaml.maml_loss(fn, params, [torch.zeros(3, dtype=F64)], *data, steps=2)
    with pytest.raises(TypeError, match="lrs"):
        fastmaml.maml_loss(fn, params, torch.tensor(0.1), *data, steps=2)
    with pytest.raises(ValueError, match="backend must be one of"):
        fastmaml.maml_loss(fn, params, 0.1, *data, steps=2, backend="x")


def test_meta_loss_under_no_grad_is_the_same_number():
    m = fastmaml.MAML(_mlp(), inner_lr=0.1, inner_steps=2)
    data = _good()
    with torch.no_grad():
        a = m(*data)
    b = m(*data)
    assert not a.requires_grad and b.requires_grad
    assert_close("meta-loss", a, b.detach(), 1e-14)


def test_every_knob_is_a_keyword_argument_and_a_settable_attribute():
    """task_map, hvp, hvp_map, task_threads, graph_memory_mb and fused_batch_norm are
    constructor keywords (checked there, naming the argument) and stay attributes the
    next call reads; a non-default set of them gives the reference's numbers."""
    torch.manual_seed(0)
    model = conv_bn_net(True, ch=2, classes=3).double()
    xs, xq = torch.randn(2, 3, 1, 8, 8, dtype=F64), torch.randn(2, 4, 1, 8, 8, dtype=F64)
    ys, yq = torch.randint(0, 3, (2, 3)), torch.randint(0, 3, (2, 4))
    knobs = dict(task_map="loop", hvp="rev_rev", hvp_map="vmap", task_threads=1, graph_memory_mb=0.0,
                 fused_batch_norm=False)
    m = fastmaml.MAML(model, inner_lr=0.05, inner_steps=2, loss="cross_entropy", **knobs)
    assert {k: getattr(m, k) for k in knobs} == knobs
    ref = fastmaml.MAML(model, inner_lr=0.05, inner_steps=2, loss="cross_entropy", backend="reference")
    assert_close("meta-loss", m(xs, ys, xq, yq).detach(), ref(xs, ys, xq, yq).detach(), 1e-10)
    assert "loop" in m.path_reason and "rev_rev" in m.path_reason
    m.task_map, m.hvp = "vmap", "fwd_rev"  # settable: the next call takes them
    assert_close("meta-loss", m(xs, ys, xq, yq).detach(), ref(xs, ys, xq, yq).detach(), 1e-10)
    assert "vmap" in m.path_reason and "fwd_rev" in m.path_reason
    for bad, err, msg in [(dict(task_map="grid"), ValueError, "task_map must be one of"),
                          (dict(hvp="newton"), ValueError, "hvp must be one of"),
                          (dict(hvp_map="grouped"), ValueError, "hvp_map must be one of"),
                          (dict(task_threads=0), ValueError, "task_threads must be 'auto' or a positive int"),
                          (dict(graph_memory_mb=-1), ValueError, "graph_memory_mb must be a finite number"),
                          (dict(fused_batch_norm="yes"), TypeError, "fused_batch_norm must be a bool")]:
        with pytest.raises(err, match=msg):
            fastmaml.MAML(model, inner_lr=0.05, inner_steps=2, loss="cross_entropy", **bad)
