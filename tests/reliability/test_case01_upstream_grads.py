"""Case 1: gradients to anything upstream of the inputs (an encoder trained jointly in
front of MAML) and to tensors a ``maml_loss`` fn closes over must reach them on every
path, equal to the reference backend's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastmaml
from reliab_paths import F64, FAST_PATHS, assert_grads_equal, build, check_path, grads, reference_twin


def _encoder(image: bool) -> nn.Module:
    torch.manual_seed(3)
    return (nn.Conv2d(1, 1, 1) if image else nn.Linear(1, 1)).to(F64)


@pytest.mark.parametrize("path", FAST_PATHS)
def test_encoder_in_front_of_maml_gets_the_reference_gradient(path):
    m, (xs, ys, xq, yq), expected = build(path)
    twin = reference_twin(m)
    enc = _encoder(xs.dim() == 5)
    enc_ref = _encoder(xs.dim() == 5)

    def apply(e, x):
        return e(x.flatten(0, 1)).view_as(x)

    twin(apply(enc_ref, xs), ys, apply(enc_ref, xq), yq).backward()
    m(apply(enc, xs), ys, apply(enc, xq), yq).backward()
    assert_grads_equal("encoder", grads(enc), grads(enc_ref))
    assert_grads_equal("model", grads(m.model), grads(twin.model))


@pytest.mark.parametrize("path", FAST_PATHS)
def test_inputs_requiring_grad_get_the_reference_gradient(path):
    m, data, _ = build(path)
    twin = reference_twin(m)
    leaves = [d.clone().requires_grad_(True) for d in data]
    ref_leaves = [d.clone().requires_grad_(True) for d in data]
    twin(*ref_leaves).backward()
    m(*leaves).backward()
    assert_grads_equal("inputs", [t.grad for t in leaves], [t.grad for t in ref_leaves])


class _Closure(nn.Module):
    """A model whose forward uses tensors that are not its parameters: a scale and a
    head held as plain attributes (trained by the caller)."""

    def __init__(self, scale: torch.Tensor, head: torch.Tensor) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(1, 4).to(F64)
        self.scale, self.head = scale, head

    def forward(self, x):
        return torch.tanh(self.body(x)) @ self.head.T * self.scale


@pytest.mark.parametrize("attrs", [{}, {"task_map": "loop"}, {"task_map": "loop", "task_threads": 1}])
def test_closed_over_tensors_get_the_reference_gradient(attrs):
    xs, ys, xq, yq = (torch.randn(3, 5, 1, dtype=F64) for _ in range(4))
    out = {}
    for backend in ("reference", "auto"):
        scale = torch.tensor(1.5, dtype=F64, requires_grad=True)
        head = torch.linspace(-1, 1, 4, dtype=F64).reshape(1, 4).requires_grad_(True)
        m = fastmaml.MAML(_Closure(scale, head), inner_lr=0.1, inner_steps=2, backend=backend)
        for k, v in attrs.items():
            setattr(m, k, v)
        m(xs, ys, xq, yq).backward()
        out[backend] = [scale.grad, head.grad, *grads(m.model)]
    assert_grads_equal("closed-over", out["auto"], out["reference"])


def test_closed_over_tensor_of_a_functional_fn_gets_the_reference_gradient():
    torch.manual_seed(0)
    params = {"w": torch.randn(4, 1, dtype=F64, requires_grad=True), "b": torch.zeros(4, dtype=F64, requires_grad=True)}
    xs, ys, xq, yq = (torch.randn(3, 5, 1, dtype=F64) for _ in range(4))
    out = {}
    for backend in ("reference", "auto"):
        scale = torch.tensor(1.5, dtype=F64, requires_grad=True)
        for p in params.values():
            p.grad = None

        def fn(p, x):
            return torch.tanh(x @ p["w"].T + p["b"]).sum(-1, keepdim=True) * scale

        fastmaml.maml_loss(fn, params, 0.1, xs, ys, xq, yq, steps=2, backend=backend).backward()
        out[backend] = [scale.grad, params["w"].grad.clone(), params["b"].grad.clone()]
    assert_grads_equal("closed-over", out["auto"], out["reference"])


def test_functional_maml_loss_on_the_fused_route_passes_input_gradients():
    m, data, _ = build("fused_mlp")
    params = dict(m.model.named_parameters())
    leaves = [d.clone().requires_grad_(True) for d in data]
    ref_leaves = [d.clone().requires_grad_(True) for d in data]
    fastmaml.maml_loss(m.model, params, 0.1, *ref_leaves, steps=2, backend="reference").backward()
    fastmaml.maml_loss(m.model, params, 0.1, *leaves, steps=2).backward()
    assert_grads_equal("inputs", [t.grad for t in leaves], [t.grad for t in ref_leaves])
