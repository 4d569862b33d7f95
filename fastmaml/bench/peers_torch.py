"""The PyTorch peers: the per-task loop (learn2learn's algorithm, and in float64 the
reference every method is checked against), ``higher``, torch.func ``vmap`` in eager mode
and ``torch.compile`` of it. What each computes: the docstring of ``fastmaml.bench.peers``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fastmaml.bench.configs import Batch, Config
from fastmaml.bench.peers_base import (LEARN2LEARN_NOTE, Prepared, Problem, Unavailable, _copy_model, _identity,
                                       _loss_fn, _torch_sync)


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
