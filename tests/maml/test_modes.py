"""Autocast, inference mode and torch.func around the MAML layer, on every path
(fastmaml.maml.modes; docs/DESIGN.md §7)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastmaml


def _model(kind: str) -> tuple[nn.Module, tuple, str]:
    torch.manual_seed(0)
    if kind == "mlp":
        net = nn.Sequential(nn.Linear(1, 16), nn.ReLU(), nn.Linear(16, 1))
        return net, tuple(torch.randn(3, 5, 1) for _ in range(4)), "mse"
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(),
                        nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    data = (torch.randn(3, 5, 1, 6, 6), torch.randint(0, 3, (3, 5)), torch.randn(3, 5, 1, 6, 6),
            torch.randint(0, 3, (3, 5)))
    return net, data, "cross_entropy"


PATHS = [("mlp", "auto", "fused_mlp"), ("mlp", "reference", "reference"), ("conv", "auto", "generic"),
         ("conv", "reference", "reference")]


@pytest.mark.parametrize("kind,backend,path", PATHS)
def test_inference_mode_adapt_predict_forward(kind, backend, path):
    net, (xs, ys, xq, yq), loss = _model(kind)
    maml = fastmaml.MAML(net, inner_lr=0.01, inner_steps=2, loss=loss, backend=backend)
    with torch.no_grad():
        want_loss = maml(xs, ys, xq, yq)
        want_pred = maml.predict(maml.adapt(xs, ys, steps=2), xq)
    assert maml.path == path
    with torch.inference_mode():
        ixs, iys, ixq, iyq = (t.clone() for t in (xs, ys, xq, yq))  # inference tensors
        got_loss = maml(ixs, iys, ixq, iyq)
        got_pred = maml.predict(maml.adapt(ixs, iys, steps=2), ixq)
    assert not got_loss.requires_grad and not got_pred.requires_grad
    torch.testing.assert_close(got_loss, want_loss, rtol=0, atol=0)
    torch.testing.assert_close(got_pred, want_pred, rtol=0, atol=0)


@pytest.mark.parametrize("kind,backend,path", PATHS)
def test_autocast_policy_float32_bitwise_for_every_thread_setting(kind, backend, path):
    net, data, loss = _model(kind)
    maml = fastmaml.MAML(net, inner_lr=0.01, inner_steps=2, loss=loss, backend=backend)
    plain = maml(*data)
    got = {}
    for tt in ("auto", 1):
        maml.task_threads = tt
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = maml(*data)
        grads = torch.autograd.grad(out, list(net.parameters()))
        got[tt] = (out, grads)
        assert out.dtype == torch.float32 and maml.path == path
    assert torch.equal(got["auto"][0], got[1][0])
    # the meta-gradient's task sum runs in a thread-dependent order on the generic path (rounding only)
    for a, b in zip(got["auto"][1], got[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # autocast is ignored: the numbers of the plain float32 call, on every path
    assert torch.equal(got[1][0], plain.detach())


def test_autocast_consistent_across_paths():
    net, data, loss = _model("mlp")
    outs = []
    for backend in ("auto", "reference"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(fastmaml.MAML(net, inner_lr=0.01, inner_steps=2, loss=loss, backend=backend)(*data))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_torch_func_over_maml_loss_raises_one_clear_error(kind):
    net, (xs, ys, xq, yq), loss = _model(kind)
    params = {k: v.detach() for k, v in net.named_parameters()}

    def f(p):
        return fastmaml.maml_loss(net, p, 0.01, xs, ys, xq, yq, steps=2, loss=loss)

    for transform in (lambda: torch.func.grad(f)(params), lambda: torch.func.vjp(f, params)):
        with pytest.raises(RuntimeError, match=r"torch\.func transform.*torch\.autograd\.grad"):
            transform()
    batched = tuple(torch.stack([t, t]) for t in (xs, ys, xq, yq))
    maml = fastmaml.MAML(net, inner_lr=0.01, inner_steps=2, loss=loss)
    with pytest.raises(RuntimeError, match=r"concatenate them along the task dimension"):
        torch.func.vmap(lambda a, b, c, d: maml(a, b, c, d))(*batched)
