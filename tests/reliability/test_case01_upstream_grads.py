"""Case 1: gradients to anything upstream of the inputs (an encoder trained jointly in
front of MAML) and to tensors a ``maml_loss`` fn closes over must reach them on every
path, equal to the reference backend's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastmaml
from reliab_paths import F64, FAST_PATHS, XFAIL, assert_grads_equal, build, check_path, grads, reference_twin


def _encoder(image: bool) -> nn.Module:
    torch.manual_seed(3)
    return (nn.Conv2d(1, 1, 1) if image else nn.Linear(1, 1)).to(F64)


@XFAIL
@pytest.mark.parametrize("path", FAST_PATHS)
def test_encoder_in_front_of_maml_gets_the_reference_gradient(path):
    m, (xs, ys, xq, yq), expected = build(path)
    twin = reference_twin(m)
    enc = _encoder(xs.dim() == 5)
    enc_ref = _encoder(xs.dim() == 5)
    twin(enc_ref(xs), ys, enc_ref(xq), yq).backward()
    m(enc(xs), ys, enc(xq), yq).backward()
    assert_grads_equal("encoder", grads(enc), grads(enc_ref))
    assert_grads_equal("model", grads(m.model), grads(twin.model))


@XFAIL
@pytest.mark.parametrize("path", FAST_PATHS)
def test_inputs_requiring_grad_get_the_reference_gradient(path):
    m, data, _ = build(path)
    twin = reference_twin(m)
    leaves = [d.clone().requires_grad_(True) for d in data]
    ref_leaves = [d.clone().requires_grad_(True) for d in data]
    twin(*ref_leaves).backward()
    m(*leaves).backward()
    assert_grads_equal("inputs", [t.grad for t in leaves], [t.grad for t in ref_leaves])


@XFAIL
@pytest.mark.parametrize("task_map", ["vmap", "loop"])
def test_closed_over_tensor_gets_the_reference_gradient(task_map):
    torch.manual_seed(0)
    params = {"w": torch.randn(4, 1, dtype=F64, requires_grad=True), "b": torch.zeros(4, dtype=F64, requires_grad=True)}
    scale = torch.tensor(1.5, dtype=F64, requires_grad=True)
    head = torch.randn(1, 4, dtype=F64, requires_grad=True)

    def fn(p, x):
        return torch.tanh(x @ p["w"].T + p["b"]) @ head.T * scale

    xs, ys, xq, yq = (torch.randn(3, 5, 1, dtype=F64) for _ in range(4))
    out = {}
    for backend in ("reference", "auto"):
        for t in (scale, head, *params.values()):
            t.grad = None
        kw = {} if backend == "reference" else {"task_map": task_map}
        if backend == "reference":
            loss = fastmaml.maml_loss(fn, params, 0.1, xs, ys, xq, yq, steps=2, backend="reference")
        else:
            loss = fastmaml.generic.maml_loss(fn, params, 0.1, xs, ys, xq, yq, steps=2, **kw)
        loss.backward()
        out[backend] = [scale.grad, head.grad, params["w"].grad, params["b"].grad]
        out[backend] = [None if g is None else g.clone() for g in out[backend]]
    assert_grads_equal("closed-over", out["auto"], out["reference"])


@XFAIL
def test_functional_maml_loss_on_the_fused_route_passes_input_gradients():
    m, data, _ = build("fused_mlp")
    params = dict(m.model.named_parameters())
    leaves = [d.clone().requires_grad_(True) for d in data]
    ref_leaves = [d.clone().requires_grad_(True) for d in data]
    fastmaml.maml_loss(m.model, params, 0.1, *ref_leaves, steps=2, backend="reference").backward()
    fastmaml.maml_loss(m.model, params, 0.1, *leaves, steps=2).backward()
    assert_grads_equal("inputs", [t.grad for t in leaves], [t.grad for t in ref_leaves])
