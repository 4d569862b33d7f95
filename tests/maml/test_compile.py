"""``torch.compile`` of the meta-loss and of a whole training step (docs/DESIGN.md §7):
0 graph breaks and ``fullgraph=True`` on the fused MLP route (and its layer-wise
route), numbers equal to eager, no graph break inside ``fastmaml/`` in a compiled step,
no recompile over 50 steps of new data. Compiles are slow on a small CPU: each compiled
function is built once per module (fixtures) and shared."""

from __future__ import annotations

import operator
import os

import pytest
import torch
from torch import nn

import fastmaml

FASTMAML_DIR = os.path.dirname(os.path.abspath(fastmaml.__file__))


def _mlp(dims, dtype=torch.float32):
    torch.manual_seed(0)
    layers: list = []
    for i in range(len(dims) - 1):
        layers += [nn.Linear(dims[i], dims[i + 1]), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).to(dtype)


def _data(dims, T, N, loss, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs, xq = (torch.randn(T, N, dims[0], generator=g, dtype=dtype) for _ in range(2))
    if loss == "mse":
        ys, yq = (torch.randn(T, N, dims[-1], generator=g, dtype=dtype) for _ in range(2))
    else:
        ys, yq = (torch.randint(0, dims[-1], (T, N), generator=g) for _ in range(2))
    return xs, ys, xq, yq


CASES = {
    "sinusoid": ([1, 40, 40, 1], "mse", torch.float32, "fused_mlp", 5),
    "sinusoid64": ([1, 40, 40, 1], "mse", torch.float64, "fused_mlp", 5),
    "wide": ([784, 256, 128, 64, 64, 5], "cross_entropy", torch.float32, "fused_mlp", 2),
    # past the fused kernel's CPU workspace limit: the layer-wise route
    "layerwise": ([64, 1024, 1024, 5], "cross_entropy", torch.float32, "mlp_layerwise", 2),
}


def _fresh_caches():
    """Dynamo guards on the entries of fastmaml's module-level caches it read while
    tracing; a cache filled by an earlier case's eager calls changes under those guards
    (seen as an IndexError inside guard building), so each case traces from empty caches
    and a reset compiler."""
    from fastmaml.maml import dispatch
    from fastmaml.ops import maml_mlp_fit
    from fastmaml.ops._maml_mlp import config, function

    for cache in (maml_mlp_fit._FITS_CACHE, config._MSL_CACHE, function._RESOLVE_CACHE, dispatch._CACHE):
        cache.clear()
    torch._dynamo.reset()


@pytest.fixture(scope="module", params=list(CASES))
def compiled_loss(request):
    dims, loss, dtype, path, T = CASES[request.param]
    maml = fastmaml.MAML(_mlp(dims, dtype), inner_lr=0.01, inner_steps=3, loss=loss, lr_mode="per_step_layer",
                         learn_lr=True)
    data = _data(dims, T, 5, loss, dtype)
    f = lambda xs, ys, xq, yq: maml(xs, ys, xq, yq)  # noqa: E731
    _fresh_caches()
    explained = torch._dynamo.explain(f)(*data)
    return maml, f, torch.compile(f, fullgraph=True), data, path, dtype, explained


def test_meta_loss_zero_graph_breaks_fullgraph_equals_eager(compiled_loss):
    maml, f, cf, data, path, dtype, explained = compiled_loss
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1
    params = list(maml.parameters())
    eager = f(*data)
    assert maml.path == path
    g_eager = torch.autograd.grad(eager, params)
    for seed in (0, 1):  # new data of the same shapes: no recompile
        d = data if seed == 0 else _data([data[0].shape[-1]], 1, 1, "mse", dtype)
        if seed:
            d = tuple(x + 0.5 if x.is_floating_point() else x for x in data)
            eager = f(*d)
            g_eager = torch.autograd.grad(eager, params)
        out = cf(*d)
        g = torch.autograd.grad(out, params)
        tol = dict(rtol=0, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out, eager, **tol)
        for a, b in zip(g, g_eager):
            torch.testing.assert_close(a, b, **tol)


def test_compiled_meta_loss_keeps_the_nan_policy(compiled_loss):
    maml, f, cf, data, path, dtype, _ = compiled_loss
    xs = data[0].clone()
    xs[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="xs"):
        cf(xs, *data[1:])


def _training_step(maml, opt):
    """The user's training step: zero_grad, meta-loss, backward, optimizer step."""

    def step(xs, ys, xq, yq):
        opt.zero_grad()
        loss = maml(xs, ys, xq, yq)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


@pytest.fixture(scope="module")
def sinusoid_step():
    maml = fastmaml.MAML(_mlp([1, 40, 40, 1]), inner_lr=0.01, inner_steps=2, lr_mode="per_step_layer",
                         learn_lr=True)
    opt = torch.optim.SGD(maml.parameters(), lr=1e-3)
    return maml, opt, _training_step(maml, opt)


def test_compiled_training_step_no_break_inside_fastmaml_no_recompiles(sinusoid_step):
    maml, opt, step = sinusoid_step
    dims = [1, 40, 40, 1]
    torch._dynamo.reset()
    explained = torch._dynamo.explain(step)(*_data(dims, 4, 5, "mse", torch.float32))
    inside = [(b.reason, str(fr)) for b in explained.break_reasons for fr in b.user_stack
              if os.path.abspath(fr.filename).startswith(FASTMAML_DIR)]
    assert inside == []
    # the compiled step equals the eager step (same start, same data)
    state = {k: v.clone() for k, v in maml.state_dict().items()}
    d0 = _data(dims, 4, 5, "mse", torch.float32, seed=7)
    eager_loss = step(*d0)
    eager_after = [p.detach().clone() for p in maml.parameters()]
    maml.load_state_dict(state)
    opt.state.clear()
    torch._dynamo.reset()
    cstep = torch.compile(step)
    torch.testing.assert_close(cstep(*d0), eager_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(maml.parameters(), eager_after):
        torch.testing.assert_close(a.detach(), b, rtol=1e-5, atol=1e-6)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for s in range(50):
            loss = cstep(*_data(dims, 4, 5, "mse", torch.float32, seed=100 + s))
            assert torch.isfinite(loss)
    # cold: a model never called eagerly (empty route cache) compiles once, then never again
    cold = fastmaml.MAML(_mlp(dims), inner_lr=0.01, inner_steps=2)
    torch._dynamo.reset()
    cf = torch.compile(lambda xs, ys, xq, yq: cold(xs, ys, xq, yq))
    cf(*_data(dims, 4, 5, "mse", torch.float32, seed=1)).backward()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for s in range(3):
            cf(*_data(dims, 4, 5, "mse", torch.float32, seed=200 + s)).backward()


def _tiny_conv(C=8, n=5):
    """The Omniglot 4-conv pattern (conv, BatchNorm with batch statistics, ReLU, max-pool),
    tiny: 2 blocks of 8 channels on 8x8 images, so the compile stays fast."""
    torch.manual_seed(0)
    block = lambda cin: [nn.Conv2d(cin, C, 3, padding=1), nn.BatchNorm2d(C, track_running_stats=False),  # noqa: E731
                         nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*block(1), *block(C), nn.Flatten(), nn.Linear(C * 2 * 2, n))


def test_conv_meta_loss_one_named_graph_break_equals_eager():
    """The generic conv path: exactly ONE graph break, at the call of the generic
    meta-step (module.py ``_forward`` calling the ``torch.compiler.disable``\\ d
    ``_run_generic``: its inner loop differentiates with torch.autograd.grad inside an
    autograd.Function, which Dynamo does not trace; docs/DESIGN.md §7). Nothing else in
    fastmaml breaks the graph (no ``.item()``, no thread-pool calls); the compiled
    meta-loss and its gradient equal eager."""
    from fastmaml.maml import module as module_mod

    maml = fastmaml.MAML(_tiny_conv(), inner_lr=0.4, inner_steps=1, loss="cross_entropy")
    g = torch.Generator().manual_seed(0)
    T, N = 2, 5
    xs, xq = (torch.randn(T, N, 1, 8, 8, generator=g) for _ in range(2))
    ys, yq = (torch.randint(0, 5, (T, N), generator=g) for _ in range(2))
    f = lambda xs, ys, xq, yq: maml(xs, ys, xq, yq)  # noqa: E731
    _fresh_caches()
    explained = torch._dynamo.explain(f)(xs, ys, xq, yq)
    assert maml.path == "generic"
    assert explained.graph_break_count == 1, [b.reason for b in explained.break_reasons]
    src = open(module_mod.__file__).read().splitlines()
    for b in explained.break_reasons:  # Dynamo lists the one break once per frame it restarts
        assert "torch.compiler.disable" in b.reason and "_run_generic" in b.reason, b.reason
        assert "torch.autograd.grad inside an autograd.Function" in b.reason, b.reason
        top = b.user_stack[-1]
        assert os.path.abspath(top.filename) == os.path.abspath(module_mod.__file__), top
        assert top.name == "_forward" and "_run_generic(" in src[top.lineno - 1], (top, src[top.lineno - 1])
    params = list(maml.parameters())
    eager = f(xs, ys, xq, yq)
    out = torch.compile(f)(xs, ys, xq, yq)
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
    for a, b in zip(torch.autograd.grad(out, params), torch.autograd.grad(eager, params)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
def test_compiled_step_cuda_graphs_equal_eager():
    """``torch.compile(step, mode="reduce-overhead")`` on CUDA: the graphs around
    fastmaml's ops are captured into CUDA graphs (the ops read nothing back to the host
    and allocate only their outputs and workspace: tests/emulated/test_capture_safety.py),
    and four steps of new data give the eager step's losses and parameters."""
    dims = [1, 40, 40, 1]
    dev = torch.device("cuda")
    maml = fastmaml.MAML(_mlp(dims).to(dev), inner_lr=0.01, inner_steps=2, lr_mode="per_step_layer", learn_lr=True)
    start = {k: v.clone() for k, v in maml.state_dict().items()}
    batches = [tuple(t.to(dev) for t in _data(dims, 4, 5, "mse", torch.float32, seed=300 + s)) for s in range(4)]

    def run(compiled: bool):
        maml.load_state_dict(start)
        step = _training_step(maml, torch.optim.SGD(maml.parameters(), lr=1e-3))
        f = torch.compile(step, mode="reduce-overhead") if compiled else step
        losses = [f(*b).clone() for b in batches]  # clone: a CUDA graph's output is overwritten by its next replay
        torch.cuda.synchronize()
        return losses, [p.detach().clone() for p in maml.parameters()]

    _fresh_caches()
    eager_losses, eager_params = run(False)
    assert maml.path == "fused_mlp"
    torch._dynamo.reset()
    losses, params = run(True)
    for a, b in zip(losses, eager_losses):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(params, eager_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lr_mode", ["fixed", "per_step_layer", "per_step_element"])
def test_compiled_sinusoid_graphs_are_the_two_fastmaml_ops_on_the_fused_route(lr_mode, monkeypatch):
    """The regression behind a 20-30x slower compiled sinusoid step: the graphs AOTAutograd
    hands the compiler must be ONE fastmaml::maml_mlp node (forward) and ONE
    fastmaml::maml_mlp_backward node (backward), nothing the compiler would turn into a
    generated kernel (the backward's scaling multiplies became an OpenMP-parallel kernel,
    tens of ms per step right after the fused kernel on a loaded CPU; the default MSL
    weights a kernel of its own, a C++ compile at the first call); and the op must take
    the fused kernel, never the layer-wise loop."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    from fastmaml.ops._maml_mlp import library

    graphs: dict = {}

    def keep(kind):
        def compiler(gm, _inputs):
            graphs[kind] = gm
            return make_boxed_func(gm.forward)
        return compiler

    routes = {"fused": 0, "layerwise": 0}
    run_fused, run_layerwise = library.run_fused, library.run_layerwise

    def fused(*a, **k):
        routes["fused"] += 1
        return run_fused(*a, **k)

    def layerwise(*a, **k):
        routes["layerwise"] += 1
        return run_layerwise(*a, **k)

    monkeypatch.setattr(library, "run_fused", fused)
    monkeypatch.setattr(library, "run_layerwise", layerwise)
    dims = [1, 40, 40, 1]
    kw = {} if lr_mode == "fixed" else {"lr_mode": lr_mode, "learn_lr": True}
    maml = fastmaml.MAML(_mlp(dims), inner_lr=0.01, inner_steps=3, **kw)
    f = lambda xs, ys, xq, yq: maml(xs, ys, xq, yq)  # noqa: E731
    _fresh_caches()
    cf = torch.compile(f, backend=aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward")),
                       fullgraph=True)
    params = list(maml.parameters())
    d = _data(dims, 4, 5, "mse", torch.float32, seed=3)
    eager_grads = torch.autograd.grad(f(*d), params)
    routes.update(fused=0, layerwise=0)  # the eager call above runs its own Function, not the op
    compiled_grads = torch.autograd.grad(cf(*d), params)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert routes == {"fused": 1, "layerwise": 0}
    trivial = {"placeholder", "output"}
    for kind, op in (("forward", torch.ops.fastmaml.maml_mlp.default),
                     ("backward", torch.ops.fastmaml.maml_mlp_backward.default)):
        calls = [n.target for n in graphs[kind].graph.nodes if n.op not in trivial]
        assert calls.count(op) == 1, (kind, calls)
        # getitem picks outputs, detach marks a tensor saved for the backward: no compute
        others = [t for t in calls if t not in (op, operator.getitem, torch.ops.aten.detach.default)]
        assert others == [], (kind, others)
