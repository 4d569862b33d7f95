"""fastmaml.MAML / fastmaml.maml_loss pick the fused MLP op by themselves for
nn.Sequential MLPs of Linear and ReLU/Tanh, report the path and why, and give the
reference's numbers on every variant; everything else takes the generic path."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastmaml
from fastmaml.maml import mlp_path

from tests.helpers import assert_close
from tests.maml.cases import meta_batch

F64 = torch.float64


def mlp(sizes=(3, 8, 6, 2), act=nn.ReLU, dtype=F64, seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers).to(dtype)


def grads_of(maml: fastmaml.MAML, data) -> tuple[torch.Tensor, list[torch.Tensor]]:
    maml.zero_grad(set_to_none=True)
    loss = maml(*data)
    loss.backward()
    ps = list(maml.model.parameters()) + [p for p in maml.lrs if p.requires_grad]
    return loss.detach(), [p.grad.clone() for p in ps]


VARIANTS = [
    # lr_mode, learn_lr, first_order, msl
    ("scalar", False, False, None),
    ("scalar", True, False, None),
    ("scalar", True, True, None),
    ("per_step_layer", True, False, None),
    ("per_element", True, False, None),
    ("per_step_element", True, False, [0.2, 0.3, 1.0]),
    ("scalar", False, True, [0.5, 0.0, 1.0]),
]


@pytest.mark.parametrize("lr_mode,learn_lr,first_order,msl", VARIANTS)
@pytest.mark.parametrize("act,loss", [(nn.ReLU, "mse"), (nn.Tanh, "cross_entropy")])
def test_module_takes_fused_path_and_matches_reference(lr_mode, learn_lr, first_order, msl, act, loss):
    model = mlp(act=act)
    classes = 2 if loss == "cross_entropy" else None
    data = meta_batch(4, 5, 7, 3, 2, classes=classes)
    kw = dict(inner_lr=0.3, inner_steps=3, first_order=first_order, lr_mode=lr_mode, learn_lr=learn_lr, loss=loss,
              msl_weights=msl)
    fast = fastmaml.MAML(model, **kw)
    ref = fastmaml.MAML(copy.deepcopy(model), backend="reference", **kw)
    with torch.no_grad():  # same (non-trivial) learning rates in both
        for a, b in zip(fast.lrs, ref.lrs):
            a.copy_(0.1 + 0.2 * torch.rand_like(a))
            b.copy_(a)
    lf, gf = grads_of(fast, data)
    assert fast.path == "fused_mlp", fast.path_reason
    assert "fused MLP kernel" in fast.path_reason
    lr_, gr = grads_of(ref, data)
    assert ref.path == "reference"
    assert_close("meta-loss", lf, lr_, atol=1e-10, rtol=1e-10)
    assert len(gf) == len(gr)
    for i, (a, b) in enumerate(zip(gf, gr)):
        assert_close(f"grad[{i}]", a, b, atol=1e-10, rtol=1e-10)


def test_inputs_and_parameters_unchanged_by_the_fused_meta_step():
    model = mlp()
    maml = fastmaml.MAML(model, inner_lr=0.1, inner_steps=2)
    data = meta_batch(3, 4, 4, 3, 2)
    before = [t.clone() for t in data] + [p.detach().clone() for p in model.parameters()]
    maml(*data).backward()
    assert maml.path == "fused_mlp"
    after = list(data) + [p.detach() for p in model.parameters()]
    for a, b in zip(before, after):
        assert torch.equal(a, b)


def test_functional_maml_loss_with_a_module_takes_fused_path():
    model = mlp()
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    data = meta_batch(3, 5, 6, 3, 2)
    out = fastmaml.maml_loss(model, params, 0.2, *data, steps=2)
    g = torch.autograd.grad(out, list(params.values()))

    def fn(p, x):  # the same network as a pure function: generic path
        return torch.func.functional_call(model, p, (x,))

    ref = fastmaml.maml_loss(fn, params, 0.2, *data, steps=2, backend="reference")
    gr = torch.autograd.grad(ref, list(params.values()))
    assert_close("meta-loss", out.detach(), ref.detach(), atol=1e-10, rtol=1e-10)
    for a, b in zip(g, gr):
        assert_close("grad", a, b, atol=1e-10, rtol=1e-10)
    with pytest.raises(RuntimeError, match="once-differentiable|double backward|create_graph"):
        g2 = torch.autograd.grad(fastmaml.maml_loss(model, params, 0.2, *data, steps=2), list(params.values()),
                                 create_graph=True)
        g2[0].sum().backward()


def test_past_the_fused_limit_takes_the_layerwise_mlp_path(monkeypatch):
    from fastmaml.ops import maml_mlp as op_module  # the function; its module holds the limit

    from fastmaml.ops import maml_mlp_fit as mod
    monkeypatch.setattr(mod, "FUSED_CPU_MAX_WORKSPACE_BYTES", 1024)
    monkeypatch.setattr(mod, "_FITS_CACHE", {})
    assert op_module is not None
    model = mlp()
    maml = fastmaml.MAML(model, inner_lr=0.1, inner_steps=2)
    ref = fastmaml.MAML(copy.deepcopy(model), inner_lr=0.1, inner_steps=2, backend="reference")
    data = meta_batch(3, 4, 4, 3, 2)
    lf, gf = grads_of(maml, data)
    assert maml.path == "mlp_layerwise", maml.path_reason
    assert "past the fused limits" in maml.path_reason
    lr_, gr = grads_of(ref, data)
    assert_close("meta-loss", lf, lr_, atol=1e-10, rtol=1e-10)
    for a, b in zip(gf, gr):
        assert_close("grad", a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize(
    "case,reason",
    [
        ("anil", "subset"),
        ("callable_loss", "custom loss"),
        ("no_bias", "without bias"),
        ("sigmoid", "expected nn.ReLU or nn.Tanh"),
        ("frozen", "frozen"),
        ("not_sequential", "not an nn.Sequential"),
    ],
)
def test_other_models_take_the_generic_path_and_say_why(case, reason):
    model = mlp()
    kw: dict = dict(inner_lr=0.1, inner_steps=2)
    if case == "anil":
        kw["adapt"] = ["4.weight", "4.bias"]
    elif case == "callable_loss":
        kw["loss"] = lambda pred, y: ((pred - y) ** 2).mean()
    elif case == "no_bias":
        model = nn.Sequential(nn.Linear(3, 8, bias=False), nn.ReLU(), nn.Linear(8, 2)).to(F64)
    elif case == "sigmoid":
        model = nn.Sequential(nn.Linear(3, 8), nn.Sigmoid(), nn.Linear(8, 2)).to(F64)
    elif case == "frozen":
        model[0].bias.requires_grad_(False)
    elif case == "not_sequential":

        class Wrap(nn.Module):
            def __init__(self):
                super().__init__()
                self.net = mlp()

            def forward(self, x):
                return self.net(x)

        model = Wrap()
    maml = fastmaml.MAML(model, **kw)
    data = meta_batch(2, 4, 4, 3, 2)
    loss = maml(*data)
    loss.backward()
    assert maml.path == "generic", (maml.path, maml.path_reason)
    route = mlp_path.mlp_route(model, maml._params(), maml.adapt_names, maml.loss, False, 1, 2,
                               (data[0], data[1], data[2]))
    assert route[0] is None and reason in route[1], route[1]
    assert reason in maml.path_reason, maml.path_reason  # the router's reason names why not the MLP op


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("which", [0, 1, 2, 3])
def test_nonfinite_data_is_named_on_the_fused_path(dtype, bad, which):
    # contiguous CPU data: one check in the extension for all four tensors
    model = mlp(dtype=dtype)
    maml = fastmaml.MAML(model, inner_lr=0.1, inner_steps=2)
    data = [t.to(dtype) for t in meta_batch(3, 4, 4, 3, 2)]
    data[which] = data[which].clone()
    data[which].view(-1)[-1] = bad  # the last element: the check must read every element
    name = ("xs", "ys", "xq", "yq")[which]
    with pytest.raises(ValueError, match=f"{name} contains NaN or Inf"):
        maml(*data)
    data[which] = data[which].transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous: torch reductions
    assert not data[which].is_contiguous()
    with pytest.raises(ValueError, match=f"{name} contains NaN or Inf"):
        mlp_path.finite_inputs(xs=data[0], ys=data[1], xq=data[2], yq=data[3])


def test_first_nonfinite_cpu_returns_the_index_of_the_first_bad_tensor():
    from fastmaml._ext import ext

    C = ext()
    ts = [torch.zeros(5), torch.ones(7), torch.full((3, 3), 2.0)]
    args = lambda: ([t.data_ptr() for t in ts], [t.numel() for t in ts])  # noqa: E731
    assert C.first_nonfinite_cpu(0, *args()) == -1
    ts[2][2, 2] = float("inf")
    assert C.first_nonfinite_cpu(0, *args()) == 2
    ts[1][0] = float("nan")
    assert C.first_nonfinite_cpu(0, *args()) == 1
    big = torch.full((4,), 1e300, dtype=F64)  # finite values whose sum overflows are finite
    assert C.first_nonfinite_cpu(1, [big.data_ptr()], [4]) == -1
    assert C.first_nonfinite_cpu(1, [], []) == -1
    with pytest.raises(ValueError, match="same length"):
        C.first_nonfinite_cpu(0, [ts[0].data_ptr()], [])
    with pytest.raises(ValueError, match="dtype code"):
        C.first_nonfinite_cpu(2, [ts[0].data_ptr()], [5])


# --- one router for both front ends --------------------------------------------------
def _bench_model(family):
    from fastmaml.bench.configs import FAMILIES, build_model

    return build_model(family), FAMILIES[family]


def _front_end_cases():
    """(id, model, data, loss, expected path, expected task map) for the benchmark
    models (tiny meta-batches; the points keep their real shapes) and a few others."""
    def labels(T, n, c):
        return torch.randint(0, c, (T, n))

    g = torch.Generator().manual_seed(0)
    cases = []
    for family in ("sinusoid", "wide_mlp", "omniglot", "miniimagenet"):
        model, fam = _bench_model(family)
        T, ns, nq = 2, 2, 3
        xs = torch.randn(T, ns, *fam.input_shape, generator=g)
        xq = torch.randn(T, nq, *fam.input_shape, generator=g)
        if fam.loss == "mse":
            ys, yq = torch.randn(T, ns, fam.n_way, generator=g), torch.randn(T, nq, fam.n_way, generator=g)
        else:
            ys, yq = labels(T, ns, fam.n_way), labels(T, nq, fam.n_way)
        mlp_fam = fam.mlp_widths is not None
        want = {"sinusoid": "fused_mlp", "wide_mlp": "fused_mlp"}.get(family, "generic")  # as benchmarked
        cases.append((family, model, (xs, ys, xq, yq), fam.loss, want, "" if mlp_fam else "loop"))
    torch.manual_seed(1)
    tanh = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2))
    d = meta_batch(2, 4, 5, 3, 2, dtype=torch.float32)
    cases.append(("tanh_mlp", tanh, d, "mse", "fused_mlp", ""))
    conv = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    xs, xq = torch.randn(2, 3, 1, 6, 6, generator=g), torch.randn(2, 4, 1, 6, 6, generator=g)
    cases.append(("conv_no_bn", conv, (xs, labels(2, 3, 3), xq, labels(2, 4, 3)), "cross_entropy", "generic",
                  "loop"))
    wide = nn.Sequential(nn.Linear(3, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 2))
    cases.append(("too_wide_mlp", wide, meta_batch(2, 4, 5, 3, 2, dtype=torch.float32), "mse", "mlp_layerwise", ""))
    flat_img = nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.ReLU(), nn.Linear(8, 3))
    cases.append(("mlp_on_images", flat_img, (xs, labels(2, 3, 3), xq, labels(2, 4, 3)), "cross_entropy",
                  "generic", "vmap"))
    return cases


_CASES = _front_end_cases()


@pytest.mark.parametrize("case", _CASES, ids=[c[0] for c in _CASES])
def test_module_and_functional_take_the_same_path(monkeypatch, case):
    """MAML(model) and maml_loss(model, ...) both ask the one router and get the same
    answer for the same model and data (4-conv nets on images: the per-task loop; MLPs:
    the fused MLP op)."""
    from fastmaml.maml import dispatch

    _, model, data, loss, want_path, want_map = case
    seen = []
    real = dispatch.route

    def spy(m, *a, **kw):
        r = real(m, *a, **kw)
        if kw.get("data") is not None:
            seen.append((m, r))
        return r

    monkeypatch.setattr(dispatch, "route", spy)
    with torch.no_grad():
        maml = fastmaml.MAML(model, inner_lr=0.1, inner_steps=1, loss=loss)
        maml(*data)
        assert len(seen) == 1 and seen[0][0] is model
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        fastmaml.maml_loss(model, params, 0.1, *data, steps=1, loss=loss)
    assert len(seen) == 2 and seen[1][0] is model
    (_, a), (_, b) = seen
    assert (a.path, a.task_map, a.reason) == (b.path, b.task_map, b.reason)
    assert a.path == want_path and a.task_map == want_map, a.reason
    assert maml.path == a.path and maml.path_reason == a.reason


@pytest.mark.parametrize("case", _CASES, ids=[c[0] for c in _CASES])
def test_path_before_the_first_call_is_the_path_for_fitting_data(case):
    _, model, data, loss, want_path, _ = case
    maml = fastmaml.MAML(model, inner_lr=0.1, inner_steps=1, loss=loss)
    before = maml.path
    assert "provisional" in maml.path_reason, maml.path_reason
    with torch.no_grad():
        maml(*data)
    assert maml.path == before == want_path, (before, maml.path, maml.path_reason)
    assert "provisional" not in maml.path_reason
