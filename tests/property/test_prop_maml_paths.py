"""Property: every MAML path agrees with ``backend="reference"`` on random MLP
meta-problems: T, Ns, Nq, K, widths, activation, loss, dtype, lr granularity (learned
or fixed), first/second order, MSL weights, contiguous or strided inputs.

The paths: the fused MLP kernel, the layer-wise MLP ops (the fused limit set to 0),
and the generic adjoint path (the same MLP behind a non-Sequential wrapper) with tasks
vmapped, looped, looped one task at a time, and the HVP flavours rev_rev / fwd_rev."""

from __future__ import annotations

import copy

import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fastmaml
from fastmaml.ops import maml_mlp_fit
from prop_util import DTYPES, assert_all_close, assert_close, seeds, strided_copy, tol

_MAML_MLP_MODULE = maml_mlp_fit  # the fused limit, read at each call


class Wrapped(nn.Module):
    """The same network, not an nn.Sequential: MAML takes the generic path."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# path -> (wrap the model?, attributes set on the MAML, expected maml.path)
PATHS = {
    "fused": (False, {}, "fused_mlp"),
    "layerwise": (False, {}, "mlp_layerwise"),
    "vmap": (True, {}, "generic"),
    "vmap_fwd_rev": (True, {"hvp": "fwd_rev"}, "generic"),
    "loop": (True, {"task_map": "loop"}, "generic"),
    "loop_one_task": (True, {"task_map": "loop", "task_threads": 1}, "generic"),
    "loop_rev_rev": (True, {"task_map": "loop", "hvp": "rev_rev"}, "generic"),
}


def _mlp(dims, act, dtype, seed):
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.ReLU() if act == "relu" else nn.Tanh())
    return nn.Sequential(*layers).to(dtype)


def _data(seed, T, Ns, Nq, din, dout, loss, dtype):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(T, Ns, din, generator=g, dtype=torch.float64).to(dtype)
    xq = torch.randn(T, Nq, din, generator=g, dtype=torch.float64).to(dtype)
    if loss == "mse":
        ys = torch.randn(T, Ns, dout, generator=g, dtype=torch.float64).to(dtype)
        yq = torch.randn(T, Nq, dout, generator=g, dtype=torch.float64).to(dtype)
    else:
        ys = torch.randint(0, dout, (T, Ns), generator=g)
        yq = torch.randint(0, dout, (T, Nq), generator=g)
    return [xs, ys, xq, yq]


def run(maml: fastmaml.MAML, data, path: str | None = None):
    """(meta-loss, grads of every parameter of ``maml`` incl. learned rates, adapted params)."""
    maml.zero_grad()
    limit = _MAML_MLP_MODULE.FUSED_CPU_MAX_WORKSPACE_BYTES
    if path == "layerwise":
        _MAML_MLP_MODULE.FUSED_CPU_MAX_WORKSPACE_BYTES = 0
    try:
        loss = maml(*data)
        loss.backward()
        fast = maml.adapt(data[0], data[1])
    finally:
        _MAML_MLP_MODULE.FUSED_CPU_MAX_WORKSPACE_BYTES = limit
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in maml.parameters() if p.requires_grad]
    return loss.detach(), grads, [v.detach() for v in fast.values()]


@given(seed=seeds(), T=st.integers(1, 3), Ns=st.integers(1, 5), Nq=st.integers(1, 5), K=st.integers(1, 3),
       dims=st.lists(st.integers(1, 8), min_size=2, max_size=4), act=st.sampled_from(["relu", "tanh"]),
       loss=st.sampled_from(["mse", "cross_entropy"]), dtype=DTYPES, first_order=st.booleans(),
       lr_mode=st.sampled_from(fastmaml.maml.LR_MODES if hasattr(fastmaml.maml, "LR_MODES") else
                               ("scalar", "per_step_layer", "per_element", "per_step_element")),
       learn_lr=st.booleans(), msl=st.booleans(), strided=st.booleans())
def test_every_mlp_path_agrees_with_the_reference(seed, T, Ns, Nq, K, dims, act, loss, dtype, first_order, lr_mode,
                                                  learn_lr, msl, strided):
    if loss == "cross_entropy" and dims[-1] < 2:
        dims = [*dims[:-1], 2]
    net = _mlp(dims, act, dtype, seed % 1000)
    data = _data(seed, T, Ns, Nq, dims[0], dims[-1], loss, dtype)
    kw = dict(inner_lr=0.1, inner_steps=K, first_order=first_order, lr_mode=lr_mode, learn_lr=learn_lr, loss=loss,
              msl_weights=[1.0 / K] * K if msl else None)
    want = run(fastmaml.MAML(copy.deepcopy(net), backend="reference", **kw), data)
    if strided:
        data = [strided_copy(t, i % 2) if t.is_floating_point() else t for i, t in enumerate(data)]
    for path, (wrap, attrs, expected) in PATHS.items():
        maml = fastmaml.MAML(Wrapped(copy.deepcopy(net)) if wrap else copy.deepcopy(net), **kw)
        for k, v in attrs.items():
            setattr(maml, k, v)
        got = run(maml, data, path)
        assert maml.path == expected, f"{path}: ran {maml.path!r} ({maml.path_reason})"
        s = 10 if first_order else 100
        assert_close(f"{path}: meta-loss", got[0], want[0], tol(dtype, 10))
        assert_all_close(f"{path}: meta-gradient", got[1], want[1], tol(dtype, s))
        assert_all_close(f"{path}: adapted parameters", got[2], want[2], tol(dtype, s))
