"""The methods the benchmark times: fastmaml and the peers a user would otherwise pick.

Each peer is written plainly and idiomatically, the way its users write it:

- ``loop``: a Python loop over tasks; per task K inner steps with
  ``torch.autograd.grad(create_graph=True)`` and one ``backward`` of the task's query
  loss. This is learn2learn's ``MAML.clone()/adapt()`` algorithm, written out, because
  learn2learn itself does not build on Python 3.11, so it is not installed here.
- ``higher``: ``higher.innerloop_ctx`` per task with a differentiable SGD.
- ``vmap``: torch.func in eager mode: ``grad`` of the mean over tasks of
  ``vmap(task_loss)``, the inner loop unrolled with ``torch.func.grad``.
- ``compile``: the strongest compiled form of it, ``torch.compile`` of the function that
  returns ``torch.func.grad`` of the vmapped meta-loss (and ``compile-ro``: the same with
  ``mode="reduce-overhead"``, CUDA graphs, on a GPU only).
- ``jax``: ``jax.jit(jax.grad(mean(vmap(task_loss))))`` of the same network with the same
  weights, written in ``jax.numpy``/``jax.lax``.
- ``fastmaml``: ``fastmaml.MAML(...)`` (whatever path it picks), and for MLPs
  ``fastmaml-generic``: the same model hidden inside an opaque module so that the
  wrapper cannot recognise the MLP and takes its generic path.

First order: the inner gradients are constants (``create_graph=False``; ``detach``;
``jax.lax.stop_gradient``), so dθ_K/dθ = I.

Every factory takes a :class:`Problem` and returns a :class:`Prepared` whose ``step(i)``
runs one meta-step on the rotated meta-batch ``i`` and returns the meta-gradient with
respect to the model's parameters (in ``model.parameters()`` order), or raises
:class:`Unavailable` with the reason.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastmaml.bench.configs import Batch, Config

LEARN2LEARN_NOTE = ("learn2learn's MAML.clone/adapt algorithm written out: learn2learn itself "
                    "does not build on Python 3.11, so it is not installed")


class Unavailable(Exception):
    """The method cannot run here; ``str(exc)`` says why."""


@dataclass
class Problem:
    cfg: Config
    model: nn.Module  # the initial network θ, float32, on ``device``; methods copy it
    batches: list[Batch]  # rotated meta-batches on ``device``
    device: torch.device


@dataclass
class Prepared:
    step: Callable[[int], Any]  # one meta-step on batch i; returns the method's raw gradient
    to_torch: Callable[[Any], list[torch.Tensor]]  # raw gradient → torch tensors, param order
    sync: Callable[[Any], None]  # wait until the raw gradient is computed
    framework: str = "torch"  # "torch" | "jax"
    info: Callable[[], dict] = field(default=lambda: {})  # e.g. fastmaml's path, compile stats
    notes: list[str] = field(default_factory=list)


def _loss_fn(loss: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if loss == "mse":
        return F.mse_loss  # mean over points and output features
    if loss == "cross_entropy":
        return F.cross_entropy  # mean over points, int64 labels
    raise ValueError(f"loss must be 'mse' or 'cross_entropy', got {loss!r}")


def _torch_sync(device: torch.device) -> Callable[[Any], None]:
    if device.type == "cuda":
        return lambda _out: torch.cuda.synchronize(device)
    return lambda _out: None


def _identity(out: Any) -> list[torch.Tensor]:
    return list(out)


def _copy_model(p: Problem, dtype: torch.dtype | None = None) -> nn.Module:
    m = copy.deepcopy(p.model)
    if dtype is not None:
        m = m.to(dtype)
    return m


# ---------------------------------------------------------------------------------
# (a) loop over tasks, autograd.grad(create_graph=True): learn2learn's algorithm
# ---------------------------------------------------------------------------------

def loop_meta_grad(model: nn.Module, batch: Batch, cfg: Config) -> list[torch.Tensor]:
    """One meta-step by the per-task loop; fills and returns the parameters' ``.grad``.

    Run in float64 this is the benchmark's ground truth: plain unrolled autograd.
    """
    loss_fn = _loss_fn(cfg.fam.loss)
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    for q in params:
        q.grad = None
    xs, ys, xq, yq = batch
    T = xs.shape[0]
    for t in range(T):
        fast = params  # learner = maml.clone()
        for _ in range(cfg.K):  # learner.adapt(support_loss)
            support = loss_fn(torch.func.functional_call(model, dict(zip(names, fast)), (xs[t],)), ys[t])
            grads = torch.autograd.grad(support, fast, create_graph=not cfg.first_order)
            fast = [w - cfg.inner_lr * g for w, g in zip(fast, grads)]
        query = loss_fn(torch.func.functional_call(model, dict(zip(names, fast)), (xq[t],)), yq[t])
        (query / T).backward()  # one backward per task; .grad accumulates the mean over tasks
    return [q.grad if q.grad is not None else torch.zeros_like(q) for q in params]


def make_loop(p: Problem) -> Prepared:
    model = _copy_model(p)
    return Prepared(lambda i: loop_meta_grad(model, p.batches[i], p.cfg), _identity, _torch_sync(p.device),
                    notes=[LEARN2LEARN_NOTE])


def reference_meta_grad(p: Problem, index: int = 0) -> list[torch.Tensor]:
    """The float64 ground truth for batch ``index``: the loop peer in float64."""
    model = _copy_model(p, torch.float64)
    batch = tuple(t.double() if t.is_floating_point() else t for t in p.batches[index])
    return [g.detach() for g in loop_meta_grad(model, batch, p.cfg)]  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------
# (b) higher.innerloop_ctx
# ---------------------------------------------------------------------------------

def make_higher(p: Problem) -> Prepared:
    try:
        import higher
    except Exception as exc:  # ImportError; higher also breaks on some torch versions
        raise Unavailable(f"higher is not installed ({exc})") from None
    cfg = p.cfg
    loss_fn = _loss_fn(cfg.fam.loss)
    model = _copy_model(p)
    params = list(model.parameters())
    inner_opt = torch.optim.SGD(params, lr=cfg.inner_lr)

    def step(i: int) -> list[torch.Tensor]:
        for q in params:
            q.grad = None
        xs, ys, xq, yq = p.batches[i]
        T = xs.shape[0]
        for t in range(T):
            # First order: track_higher_grads=False makes each step's fast weights fresh
            # leaves; the query gradient at θ_K is then the task's first-order meta-gradient.
            with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False,
                                      track_higher_grads=not cfg.first_order) as (fmodel, diffopt):
                for _ in range(cfg.K):
                    diffopt.step(loss_fn(fmodel(xs[t]), ys[t]))
                query = loss_fn(fmodel(xq[t]), yq[t]) / T
                if cfg.first_order:
                    grads = torch.autograd.grad(query, list(fmodel.parameters()))
                    for q, g in zip(params, grads):
                        q.grad = g if q.grad is None else q.grad + g
                else:
                    query.backward()
        return [q.grad if q.grad is not None else torch.zeros_like(q) for q in params]

    return Prepared(step, _identity, _torch_sync(p.device))


# ---------------------------------------------------------------------------------
# (c) torch.func vmap, eager; (d) torch.compile of it
# ---------------------------------------------------------------------------------

def _func_meta_grad(model: nn.Module, cfg: Config) -> Callable[..., dict[str, torch.Tensor]]:
    """``torch.func.grad`` of the vmapped meta-loss, as a torch.func user writes it."""
    loss_fn = _loss_fn(cfg.fam.loss)

    def support_loss(params, x, y):
        return loss_fn(torch.func.functional_call(model, params, (x,)), y)

    def task_loss(params, xs, ys, xq, yq):
        fast = params
        for _ in range(cfg.K):
            g = torch.func.grad(support_loss)(fast, xs, ys)
            if cfg.first_order:
                g = {n: v.detach() for n, v in g.items()}
            fast = {n: fast[n] - cfg.inner_lr * g[n] for n in fast}
        return support_loss(fast, xq, yq)

    def meta_loss(params, xs, ys, xq, yq):
        return torch.func.vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(params, xs, ys, xq, yq).mean()

    return torch.func.grad(meta_loss)


def make_vmap(p: Problem) -> Prepared:
    model = _copy_model(p)
    params = {n: q.detach() for n, q in model.named_parameters()}
    meta_grad = _func_meta_grad(model, p.cfg)

    def step(i: int) -> list[torch.Tensor]:
        g = meta_grad(params, *p.batches[i])
        return list(g.values())

    return Prepared(step, _identity, _torch_sync(p.device))


def _dynamo_counts() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {"unique_graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values())),
            "recompiles": int(counters["recompiles"].get("total", 0)) if "recompiles" in counters else 0}


def make_compiled(p: Problem, mode: str | None = None) -> Prepared:
    if mode == "reduce-overhead" and p.device.type != "cuda":
        raise Unavailable("mode='reduce-overhead' (CUDA graphs) needs a CUDA device")
    import torch._dynamo
    import torch._inductor.config as inductor_config

    # Cold compile every time: no FX-graph or autograd cache from an earlier run, so the
    # time to the first meta-step is the compile a user pays in a fresh process.
    inductor_config.force_disable_caches = True
    torch._dynamo.reset()
    before = _dynamo_counts()
    model = _copy_model(p)
    params = {n: q.detach() for n, q in model.named_parameters()}
    compiled = torch.compile(_func_meta_grad(model, p.cfg), mode=mode)
    cuda_graphs = mode == "reduce-overhead"

    def step(i: int) -> list[torch.Tensor]:
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        g = compiled(params, *p.batches[i])
        # CUDA graphs reuse their output buffers: copy out before the next replay.
        return [v.clone() for v in g.values()] if cuda_graphs else list(g.values())

    def info() -> dict:
        after = _dynamo_counts()
        return {k: after[k] - before[k] for k in after}

    return Prepared(step, _identity, _torch_sync(p.device), info=info,
                    notes=["cold compile (inductor caches disabled)"])


# ---------------------------------------------------------------------------------
# (e) JAX
# ---------------------------------------------------------------------------------

def _jax_layers(model: nn.Module) -> list[tuple[str, dict]]:
    """The nn.Sequential as a list of (op, settings), parameters in ``parameters()`` order."""
    if not isinstance(model, nn.Sequential):
        raise Unavailable(f"the JAX peer translates nn.Sequential models only, got {type(model).__name__}")
    spec: list[tuple[str, dict]] = []
    for m in model:
        if isinstance(m, nn.Linear):
            spec.append(("linear", {}))
        elif isinstance(m, nn.Conv2d):
            spec.append(("conv", {"stride": m.stride, "padding": m.padding}))
        elif isinstance(m, nn.BatchNorm2d):
            if m.track_running_stats:
                raise Unavailable("the JAX peer handles BatchNorm in batch-statistics mode only")
            spec.append(("bn", {"eps": m.eps}))
        elif isinstance(m, nn.ReLU):
            spec.append(("relu", {}))
        elif isinstance(m, nn.MaxPool2d):
            spec.append(("maxpool", {"k": m.kernel_size}))
        elif isinstance(m, nn.Flatten):
            spec.append(("flatten", {}))
        else:
            raise Unavailable(f"the JAX peer has no translation of {type(m).__name__}")
    return spec


def jax_forward(spec: list[tuple[str, dict]]) -> Callable:
    """``forward(params, x)`` in jax.numpy/jax.lax for a spec from :func:`_jax_layers`
    (NCHW activations and OIHW conv weights, as PyTorch lays them out)."""
    import jax.numpy as jnp
    from jax import lax

    def forward(params, x):
        it = iter(params)
        h = x
        for op, s in spec:
            if op == "linear":
                W, b = next(it), next(it)
                h = h @ W.T + b
            elif op == "conv":
                W, b = next(it), next(it)
                pad = [(s["padding"][0],) * 2, (s["padding"][1],) * 2]
                h = lax.conv_general_dilated(h, W, s["stride"], pad, dimension_numbers=("NCHW", "OIHW", "NCHW"))
                h = h + b[None, :, None, None]
            elif op == "bn":  # batch statistics, biased variance (as torch in training mode)
                g, b = next(it), next(it)
                mean = h.mean(axis=(0, 2, 3), keepdims=True)
                var = ((h - mean) ** 2).mean(axis=(0, 2, 3), keepdims=True)
                h = (h - mean) / jnp.sqrt(var + s["eps"]) * g[None, :, None, None] + b[None, :, None, None]
            elif op == "relu":
                h = jnp.maximum(h, 0)
            elif op == "maxpool":
                k = s["k"]
                h = lax.reduce_window(h, -jnp.inf, lax.max, (1, 1, k, k), (1, 1, k, k), "VALID")
            elif op == "flatten":
                h = h.reshape(h.shape[0], -1)
        return h

    return forward


def make_jax(p: Problem) -> Prepared:
    # JAX on a GPU would otherwise take 75 % of its memory at start-up, beside PyTorch's.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    try:
        import jax
        import jax.numpy as jnp
    except Exception as exc:
        raise Unavailable(f"jax is not installed ({exc})") from None
    cfg = p.cfg
    spec = _jax_layers(p.model)
    if p.device.type == "cuda":
        try:
            jdev = jax.devices("gpu")[0]
        except Exception as exc:
            raise Unavailable(f"jax has no GPU backend here ({exc}); a CPU JAX beside CUDA torch would not "
                              "be a like-for-like comparison") from None
    else:
        jdev = jax.devices("cpu")[0]

    forward = jax_forward(spec)

    if cfg.fam.loss == "mse":
        def loss_fn(pred, y):
            return jnp.mean((pred - y) ** 2)
    else:
        def loss_fn(pred, y):
            logp = jax.nn.log_softmax(pred, axis=-1)
            return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))

    def support_loss(params, x, y):
        return loss_fn(forward(params, x), y)

    def task_loss(params, xs, ys, xq, yq):
        fast = params
        for _ in range(cfg.K):
            g = jax.grad(support_loss)(fast, xs, ys)
            if cfg.first_order:
                g = jax.lax.stop_gradient(g)
            fast = [w - cfg.inner_lr * gi for w, gi in zip(fast, g)]
        return support_loss(fast, xq, yq)

    def meta_loss(params, xs, ys, xq, yq):
        return jnp.mean(jax.vmap(task_loss, in_axes=(None, 0, 0, 0, 0))(params, xs, ys, xq, yq))

    meta_grad = jax.jit(jax.grad(meta_loss))

    def to_jax(t: torch.Tensor):
        a = t.detach().cpu().numpy()
        if a.dtype == "int64":
            a = a.astype("int32")
        return jax.device_put(a, jdev)

    params = [to_jax(q) for q in p.model.parameters()]
    batches = [tuple(to_jax(t) for t in b) for b in p.batches]

    def step(i: int):
        return meta_grad(params, *batches[i])

    def to_torch(out) -> list[torch.Tensor]:
        import numpy as np

        return [torch.from_numpy(np.array(g)).to(p.device) for g in out]

    return Prepared(step, to_torch, lambda out: jax.block_until_ready(out), framework="jax",
                    notes=[f"jax {jax.__version__} on {jdev.platform}"])


# ---------------------------------------------------------------------------------
# fastmaml
# ---------------------------------------------------------------------------------

class _Opaque(nn.Module):
    """Hides a model's structure so that fastmaml.MAML cannot pick a model-specific path."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def make_fastmaml(p: Problem, backend: str = "auto", generic: bool = False) -> Prepared:
    import fastmaml

    MAML = getattr(fastmaml, "MAML", None)
    if MAML is None:
        raise Unavailable("fastmaml.MAML is not available in this checkout (the MAML layer is not merged yet)")
    if generic and p.cfg.fam.mlp_widths is None:
        raise Unavailable("fastmaml-generic is measured for MLPs only (other models always take the generic path)")
    cfg = p.cfg
    model = _copy_model(p)
    params = list(model.parameters())
    net = _Opaque(model) if generic else model
    maml = MAML(net, inner_lr=cfg.inner_lr, inner_steps=cfg.K, first_order=cfg.first_order,
                loss=cfg.fam.loss, backend=backend)

    def step(i: int) -> list[torch.Tensor]:
        for q in params:
            q.grad = None
        maml(*p.batches[i]).backward()
        return [q.grad if q.grad is not None else torch.zeros_like(q) for q in params]

    def info() -> dict:
        return {"path": str(getattr(maml, "path", "?")), "backend": backend}

    return Prepared(step, _identity, _torch_sync(p.device), info=info)


# ---------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------

METHODS: dict[str, str] = {
    "fastmaml": "fastmaml.MAML (auto path)",
    "fastmaml-generic": "fastmaml.MAML, generic path (model hidden in an opaque module)",
    "loop": "loop over tasks, autograd.grad(create_graph=True) (learn2learn's algorithm)",
    "higher": "higher.innerloop_ctx, one backward per task",
    "vmap": "torch.func grad(vmap(task_loss)), eager",
    "compile": "torch.compile(torch.func.grad(vmap meta-loss))",
    "compile-ro": "torch.compile(..., mode='reduce-overhead') (CUDA graphs)",
    "jax": "jax.jit(jax.grad(mean(vmap(task_loss))))",
}
PEERS = ("loop", "higher", "vmap", "compile", "compile-ro", "jax")
FASTMAML = ("fastmaml", "fastmaml-generic")


def make(method: str, p: Problem, backend: str = "auto") -> Prepared:
    """Prepare ``method`` (a key of :data:`METHODS`) on problem ``p``."""
    if method == "fastmaml":
        return make_fastmaml(p, backend)
    if method == "fastmaml-generic":
        return make_fastmaml(p, backend, generic=True)
    if method == "loop":
        return make_loop(p)
    if method == "higher":
        return make_higher(p)
    if method == "vmap":
        return make_vmap(p)
    if method == "compile":
        return make_compiled(p)
    if method == "compile-ro":
        return make_compiled(p, "reduce-overhead")
    if method == "jax":
        if os.environ.get("FASTMAML_BENCH_NO_JAX") == "1":
            raise Unavailable("disabled by FASTMAML_BENCH_NO_JAX=1")
        return make_jax(p)
    raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
