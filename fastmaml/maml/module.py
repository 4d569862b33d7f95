"""The ``MAML`` module: MAML and its relatives around any ``nn.Module`` that is a
function of its parameters. It holds the model, the inner learning rates (as
parameters when learned) and the knobs; which path runs a call is the router's
answer (:func:`fastmaml.maml.dispatch.route`), the same one ``maml_loss`` gets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from fastmaml import _checks
from fastmaml.maml import dispatch, functional, mlp_path, mlp_replay, modes, tasks
from fastmaml.maml.annealing import MetaState
from fastmaml.maml.hvp import HVPS
from fastmaml.maml.problem import check_model, resolve_loss, resolve_msl
from fastmaml.maml.tasks import TASK_MAPS, module_fn
from fastmaml.reference import per_step_bn

LR_MODES = ("scalar", "per_step_layer", "per_element", "per_step_element")


def check_knobs(task_map: object, hvp: object, hvp_map: object, task_threads: object, graph_memory_mb: object,
                fused_batch_norm: object) -> None:
    for name, v, allowed in (("task_map", task_map, TASK_MAPS), ("hvp", hvp, HVPS), ("hvp_map", hvp_map, TASK_MAPS)):
        if not isinstance(v, str) or v not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {v!r}")
    if task_threads != "auto" and (isinstance(task_threads, bool) or not isinstance(task_threads, int)
                                   or task_threads < 1):
        raise ValueError(f"task_threads must be 'auto' or a positive int, got {task_threads!r}")
    dispatch.graph_budget(graph_memory_mb)  # type: ignore[arg-type]
    if not isinstance(fused_batch_norm, bool):
        raise TypeError(f"fused_batch_norm must be a bool, got {type(fused_batch_norm).__name__}")


def adapted_names(model: nn.Module, adapt: Sequence[str] | None) -> list[str]:
    """The names adapted in the inner loop (all trainable parameters when None)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not names:
        raise ValueError("model has no trainable parameters (requires_grad=True)")
    if adapt is None:
        return names
    if isinstance(adapt, str):
        raise TypeError("adapt must be a list of parameter names, not a string")
    unknown = [a for a in adapt if a not in names]
    if unknown:
        raise ValueError(f"adapt names unknown or frozen parameters {unknown}; trainable parameters: {names}")
    if not list(adapt):
        raise ValueError("adapt must name at least one parameter")
    return [n for n in names if n in set(adapt)]


def make_lrs(model: nn.Module, names: list[str], lr_mode: str, inner_lr: float, steps: int,
             learn_lr: bool) -> nn.ParameterList:
    """The inner learning rates of ``lr_mode`` as parameters (frozen unless learned)."""
    params = dict(model.named_parameters())
    p0 = params[names[0]]
    kw = dict(dtype=p0.dtype, device=p0.device)
    shapes = [params[n].shape for n in names]
    if lr_mode == "scalar":
        lrs = [torch.tensor(inner_lr, **kw)] if learn_lr else []  # type: ignore[arg-type]
    elif lr_mode == "per_step_layer":
        lrs = [torch.full((steps, len(names)), inner_lr, **kw)]  # type: ignore[arg-type]
    elif lr_mode == "per_element":
        lrs = [torch.full(s, inner_lr, **kw) for s in shapes]  # type: ignore[arg-type]
    else:
        lrs = [torch.full((steps, *s), inner_lr, **kw) for s in shapes]  # type: ignore[arg-type]
    return nn.ParameterList([nn.Parameter(t, requires_grad=learn_lr) for t in lrs])


def check_args(inner_steps: object, first_order: object, lr_mode: object, learn_lr: object, inner_lr: object,
               loss: object) -> None:
    _checks.positive_int("inner_steps", inner_steps)
    for name, v in (("first_order", first_order), ("learn_lr", learn_lr)):
        if not isinstance(v, bool):
            raise TypeError(f"{name} must be a bool, got {type(v).__name__}")
    if lr_mode not in LR_MODES:
        raise ValueError(f"lr_mode must be one of {LR_MODES}, got {lr_mode!r}")
    _checks.inner_lr("inner_lr", inner_lr)
    resolve_loss(loss)


def check_fast(fast: object, xq: object) -> None:
    if not isinstance(fast, Mapping):
        raise TypeError(f"fast must be the dict returned by adapt(), got {type(fast).__name__}")
    _checks.tensor("xq", xq)
    assert isinstance(xq, torch.Tensor)
    if xq.dim() < 2:
        raise ValueError(f"xq must be [T, N, ...], got shape {tuple(xq.shape)}")
    for n, p in fast.items():
        if p.dim() == 0 or p.shape[0] != xq.shape[0]:
            raise ValueError(f"fast[{n!r}] must be [T={xq.shape[0]}, ...] like xq, got shape {tuple(p.shape)}")


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("model has no trainable parameters (requires_grad=True): every parameter is frozen")
    return params


def current_adapt(m: MAML) -> dict:
    """``params``, ``lrs`` and ``adapt`` of a call, from the parameters trainable *now*:
    a parameter frozen after ``MAML`` was built is held fixed (its rates dropped) when the
    user did not name it in ``adapt``; one named in ``adapt`` is an error; one made
    trainable since is adapted with a scalar rate, an error with per-tensor rates."""
    params, names, lrs = trainable(m.model), m.adapt_names, m._lrs_arg()
    if all(n in params for n in names) and (m._adapt_given or len(params) == len(names)):
        return dict(params=params, lrs=lrs, adapt=names)
    frozen = [n for n in names if n not in params]
    if frozen and m._adapt_given:
        raise ValueError(f"adapt names {frozen}, frozen (requires_grad=False) after MAML was built; unfreeze them "
                         "or build MAML again with the new adapt list")
    new = [] if m._adapt_given else [n for n in params if n not in names]
    if new and m.lr_mode != "scalar":
        raise ValueError(f"parameters {new} became trainable after MAML was built; lr_mode={m.lr_mode!r} has no "
                         "rate for them: build MAML again")
    keep = [i for i, n in enumerate(names) if n in params]
    if m.lr_mode == "per_step_layer":
        lrs = m.lrs[0][:, keep]
    elif m.lr_mode != "scalar":
        lrs = [m.lrs[i] for i in keep]
    adapted = {names[i] for i in keep} | set(new)
    return dict(params=params, lrs=lrs, adapt=[n for n in params if n in adapted])


def route_key(m: MAML, data: tuple | None) -> tuple[tuple | None, list, list]:
    """(cache key, Linear weights, biases) of a call of ``m``: for an ``nn.Sequential``
    everything the route depends on, with the Linear weights read without walking the
    module tree (a few µs per call); (None, [], []) otherwise (not cached)."""
    model, d = m._modules["model"], m.__dict__  # past nn.Module.__getattr__ (a Python call per lookup)
    if not (isinstance(model, nn.Sequential) and data is not None and all(isinstance(t, torch.Tensor) for t in data)):
        return None, [], []
    mods, ws, bs = mlp_path.linear_tensors(model)
    knobs = (d["backend"], d["task_map"], d["hvp"])
    if not all(isinstance(v, str) for v in knobs):
        return None, ws, bs  # not cached (ill-typed knobs: the router reports them)
    w0 = ws[0] if ws else None
    xs, ys, xq = data[:3]
    loss, msl = d["loss"], d["msl_weights"]
    key = (mods, tuple(w.requires_grad for w in ws) + tuple(b is not None and b.requires_grad for b in bs),
           xs.shape, ys.shape, xq.shape, xs.dtype, xs.device, None if w0 is None else (w0.dtype, w0.device),
           torch.is_grad_enabled(), tuple(p.requires_grad for p in m._modules["lrs"]._parameters.values()),
           loss if isinstance(loss, str) else "callable", knobs, d["inner_steps"], tuple(d["adapt_names"]),
           None if msl is None else tuple(msl))
    return key, ws, bs


class MAML(nn.Module):
    """MAML and its relatives (FOMAML, MAML++ LSLR and MSL, Meta-SGD, ANIL) around any
    ``nn.Module`` that is a function of its parameters (Linear, Conv, BatchNorm with batch
    statistics, activations, pooling).

    Args:
        model: the network; its trainable parameters are θ. BatchNorm must use batch
            statistics (``track_running_stats=False``) or be in eval mode; dropout
            must be off (eval mode or p=0): see ``check_model``.
        inner_lr: initial/fixed inner learning rate α.
        inner_steps: K ≥ 1.
        first_order: first-order MAML (inner gradients treated as constants).
        lr_mode: 'scalar' (one α), 'per_step_layer' (MAML++ LSLR, [K, n_adapted]),
            'per_element' (Meta-SGD, one tensor per adapted parameter) or
            'per_step_element' ([K, *shape] per adapted parameter).
        learn_lr: make the rates ``nn.Parameter``s with requires_grad (in ``self.lrs``)
            so any optimizer over ``self.parameters()`` trains them; for non-scalar
            modes without learn_lr they are frozen parameters.
        loss: 'mse' | 'cross_entropy' | callable loss(pred, y) -> scalar.
        adapt: names (as in ``model.named_parameters()``) adapted in the inner loop;
            None = all trainable parameters (ANIL: the head only).
        msl_weights: MAML++ multi-step-loss weights [K], None = plain MAML.
        backend: 'auto' | 'reference' (unrolled autograd) | 'cpu' | 'cuda' | 'triton'.
        task_map: how the generic path maps its tasks: 'vmap', 'loop' (one task after
            another, or on worker threads) or 'auto' (the loop on CPU for models with a
            convolution, vmap otherwise).
        hvp: how per-task Hessian-vector products are taken: 'autograd' (plain
            autograd; 'auto' = it), 'rev_rev' (torch.func vjp of grad) or 'fwd_rev'
            (torch.func jvp of grad).
        hvp_map: the task map of the backward's HVPs only: 'vmap' | 'loop' | 'auto'
            (the task map, except vmapped HVPs for the loop over small image support sets).
        task_threads: how many tasks the CPU per-task loop runs at once: 'auto' (on
            CPU with small per-task inputs, as many as torch's intra-op threads and the
            cores available: the affinity mask less the cores other processes keep busy,
            measured at first use, ``fastmaml.maml.tasks.usable_cores``; where that leaves
            fewer cores than torch's intra-op threads, the meta-step's ops run on those
            cores, ``fastmaml.maml.tasks.op_threads``) or an int (torch's threads as set).
        graph_memory_mb: memory (MiB) the support graphs of the steps before the last
            may keep for the backward (per-task loop; 0: recompute them, least memory).
        fused_batch_norm: in the CPU per-task loop, run batch-statistics BatchNorm by
            fastmaml's fused kernels (closed-form double backward); False: PyTorch's.
        first_order_until: MAML++ derivative-order annealing: first order for the first E
            outer steps (an int E; or schedule(outer_step) -> bool, True: first order),
            then second; see :mod:`fastmaml.maml.annealing` (``outer_steps`` counts them).

    ``fastmaml.nn.PerStepBatchNorm2d`` layers (MAML++ BNWB/BNRS) are fed the step index;
    their running statistics are updated once per outer step (:mod:`fastmaml.nn`).

    Every argument stays a settable attribute of the same name (``inner_steps``,
    ``adapt_names``, ``msl_weights``: resolved forms). ``self(xs, ys, xq, yq)`` returns the
    meta-loss (0-d) of the meta-batch xs [T, Ns, ...], ys, xq [T, Nq, ...], yq;
    ``.backward()`` on it fills ``.grad`` of θ and of learned rates; it is
    once-differentiable on the fast paths. ``self.path`` ('fused_mlp' | 'mlp_layerwise'
    | 'generic' | 'reference') and ``self.path_reason`` say which implementation runs
    and why: before the first call, the path for data that fit (``path_reason`` says it
    is provisional); after a call, the path that ran.

    Example::

        net = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
        maml = fastmaml.MAML(net, inner_lr=0.01, inner_steps=5, lr_mode="per_step_layer", learn_lr=True)
        opt = torch.optim.Adam(maml.parameters(), lr=1e-3)
        for xs, ys, xq, yq in tasks:        # [T, N, 1] each
            opt.zero_grad()
            maml(xs, ys, xq, yq).backward()
            opt.step()
        fast = maml.adapt(xs, ys)           # per-task adapted parameters
        pred = maml.predict(fast, xq)
    """

    def __init__(self, model: nn.Module, inner_lr: float = 0.01, inner_steps: int = 5, first_order: bool = False,
                 lr_mode: str = "scalar", learn_lr: bool = False, loss: object = "mse",
                 adapt: Sequence[str] | None = None, msl_weights: object = None, backend: str = "auto", *,
                 task_map: str = "auto", hvp: str = "auto", hvp_map: str = "auto", task_threads: int | str = "auto",
                 graph_memory_mb: float = dispatch.GRAPH_MEMORY_MB, fused_batch_norm: bool = True,
                 first_order_until: object = None) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_args(inner_steps, first_order, lr_mode, learn_lr, inner_lr, loss)
        check_knobs(task_map, hvp, hvp_map, task_threads, graph_memory_mb, fused_batch_norm)
        self.model, self.inner_steps, self.first_order, self.lr_mode = model, inner_steps, first_order, lr_mode
        self.learn_lr, self.inner_lr, self.loss = learn_lr, float(inner_lr), loss
        self.backend = functional.check_backend(backend)
        self.msl_weights = None if msl_weights is None else resolve_msl(msl_weights, inner_steps)
        self.adapt_names, self._adapt_given = adapted_names(model, adapt), adapt is not None
        self.lrs = make_lrs(model, self.adapt_names, lr_mode, self.inner_lr, inner_steps, learn_lr)
        self.task_map, self.hvp, self.hvp_map, self.task_threads = task_map, hvp, hvp_map, task_threads
        self.graph_memory_mb, self.fused_batch_norm = graph_memory_mb, fused_batch_norm
        self._meta = MetaState(model, inner_steps, first_order, first_order_until)  # type: ignore[arg-type]
        self.check_model()
        self._msl_tensor: torch.Tensor | None = None
        self._mlp_plan: tuple | None = None  # (signature, op configuration) of the last fused-MLP call
        r = self._route(None)[0]
        self.path, self.path_reason = r.path, r.reason

    def check_model(self) -> None:
        check_model(self.model)

    first_order_until = property(lambda s: s._meta.order.until, lambda s, v: s._meta.order.set_until(s.first_order, v))
    outer_steps = property(lambda self: self._meta.order.outer_steps, lambda self, n: self._meta.set_outer_steps(n))

    def _params(self) -> dict[str, torch.Tensor]:
        return trainable(self.model)

    def _lrs_arg(self) -> object:
        if self.lr_mode == "scalar":
            return self.lrs[0] if self.learn_lr else self.inner_lr
        return self.lrs[0] if self.lr_mode == "per_step_layer" else list(self.lrs)

    def _route(self, data: tuple | None) -> tuple[dispatch.Route, list, list, tuple | None]:
        key, ws, bs = route_key(self, data)
        r = functional.route_call(self.model, self._params, self._lrs_arg(), data and data[:3], steps=self.inner_steps,
                                  loss=self.loss, msl_weights=self.msl_weights, adapt=self.adapt_names,
                                  backend=self.backend, task_map=self.task_map, hvp=self.hvp, key=key)
        return functional.upstream_route(r, self.model, self._params, data), ws, bs, key

    def forward(self, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor) -> torch.Tensor:
        """Meta-loss of the meta-batch xs [T, Ns, ...], ys, xq [T, Nq, ...], yq (0-d).
        Autocast and inference mode: :mod:`fastmaml.maml.modes`."""
        modes.check_no_transform("fastmaml.MAML.forward", self.backend)
        return modes.call(_forward, self, xs, ys, xq, yq)

    def adapt(self, xs: torch.Tensor, ys: torch.Tensor, steps: int | None = None) -> dict[str, torch.Tensor]:
        """Per-task adapted parameters after ``steps`` (default K) inner steps on the
        support sets xs [T, N, ...], ys: dict name -> [T, *shape], detached (for
        evaluation). Per-step learning rates allow only steps == K."""
        return modes.call(_adapt, self, xs, ys, steps)

    def predict(self, fast: Mapping[str, torch.Tensor], xq: torch.Tensor) -> torch.Tensor:
        """Predictions of each task's adapted parameters ``fast`` (from ``adapt``) on
        xq [T, N, ...]: [T, N, ...]."""
        return modes.call(_predict, self, fast, xq)

    def _task_map(self, x: object) -> str:
        device = next(iter(self._params().values())).device
        return dispatch.choose_task_map(self.task_map, self.model, x if isinstance(x, torch.Tensor) else None, device)


def _forward(m: MAML, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor) -> torch.Tensor:
    r, ws, bs, key = m._route((xs, ys, xq, yq))
    fo, record, r, hook = m._meta.begin(m.first_order, m.training, r)
    # (not while Dynamo traces: the changed attribute would cost a recompile; eager calls set it)
    if (m.path is not r.path or m.path_reason is not r.reason) and not torch.compiler.is_compiling():
        m.path, m.path_reason = r.path, r.reason
    if r.mlp is not None:
        return _run_mlp(m, r, ws, bs, fo, (xs, ys, xq, yq), key)
    m.check_model()
    versions = m._meta.versions(m.model)
    out = _run_generic(m, r, fo, record, hook, (xs, ys, xq, yq))
    m._meta.end(record, m.model, versions)  # raises if the model modified a buffer
    return out


def _adapt(m: MAML, xs: torch.Tensor, ys: torch.Tensor, steps: int | None) -> dict[str, torch.Tensor]:
    m.check_model()
    steps = m.inner_steps if steps is None else _checks.positive_int("steps", steps)
    if m.lr_mode in ("per_step_layer", "per_step_element") and steps != m.inner_steps:
        raise ValueError(f"lr_mode={m.lr_mode!r} defines rates for {m.inner_steps} steps only; got steps={steps}")
    return functional.adapt(module_fn(m.model), xs=xs, ys=ys, **current_adapt(m), steps=steps, loss=m.loss,
                            backend=m.backend, task_map=m._task_map(xs),
                            task_threads=m.task_threads, fused_batch_norm=m.fused_batch_norm,
                            step_hook=m._meta.layers.hook(False) if m._meta.layers else None)


def _predict(m: MAML, fast: Mapping[str, torch.Tensor], xq: torch.Tensor) -> torch.Tensor:
    check_fast(fast, xq)
    m._meta.layers.set_step(m.inner_steps - 1)  # per-step layers: the last step's entry
    return functional.predict(module_fn(m.model), fast, xq, task_map=m._task_map(xq),
                              task_threads=m.task_threads)


def _run_mlp(m: MAML, r: dispatch.Route, ws: list, bs: list, first_order: bool, data: tuple,
             key: tuple | None) -> torch.Tensor:
    """The meta-loss on the fused MLP route (its MSL weights as a tensor, cached): by the
    plan of an earlier call when nothing it depends on changed (:mod:`fastmaml.maml.mlp_replay`)."""
    eager = not torch.compiler.is_compiling()  # traced: the full path, and the plan left alone
    n = tasks.op_threads(m.task_threads, ws[0].device) if eager else 0
    if n:  # other processes hold cores: the op (all its work is in the forward) on the usable ones
        with tasks.confined(n):
            return _mlp_call(m, r, ws, bs, first_order, data, key, eager)
    return _mlp_call(m, r, ws, bs, first_order, data, key, eager)


def _mlp_call(m: MAML, r: dispatch.Route, ws: list, bs: list, first_order: bool, data: tuple,
              key: tuple | None, eager: bool) -> torch.Tensor:
    lrs = m._lrs_arg()
    sig = mlp_replay.signature(key, ws, bs, lrs, data) if eager else None
    out = mlp_replay.replay(m._mlp_plan, sig, ws, bs, lrs, data, first_order) if eager else None
    if out is not None:
        return out
    msl = m._msl_tensor
    if m.msl_weights is not None and (msl is None or msl.dtype != ws[0].dtype or msl.device != ws[0].device
                                      or msl.numel() != len(m.msl_weights)):
        msl = m._msl_tensor = mlp_path.msl_tensor(m.msl_weights, ws[0])
    out, cfg = mlp_path.run_with_plan(r.mlp, ws, bs, lrs, *data, steps=m.inner_steps,  # type: ignore[arg-type]
                                      first_order=first_order, loss=m.loss, msl_weights=msl,  # type: ignore[arg-type]
                                      backend=m.backend)
    if eager:
        m._mlp_plan = mlp_replay.keep(sig, cfg)
    return out


@torch.compiler.disable(reason=functional.GENERIC_NOT_TRACED)  # and module_fn's worker threads with it
def _run_generic(m: MAML, r: dispatch.Route, first_order: bool, record: bool, hook: object,
                 data: tuple) -> torch.Tensor:
    """The meta-loss on the generic or reference path; a model with per-step layers
    (``hook``) takes their reference on the reference path."""
    ca = current_adapt(m)
    kw = dict(steps=m.inner_steps, first_order=first_order, loss=m.loss, msl_weights=m.msl_weights,
              adapt=ca["adapt"])
    if r.path == "reference" and hook is not None:
        return per_step_bn.maml_loss(m.model, ca["params"], ca["lrs"], *data, update_running_stats=record,
                                     **kw)  # type: ignore[arg-type]
    return functional.run_generic(r, module_fn(m.model), ca["params"], ca["lrs"], *data, backend=m.backend,
                                  hvp=m.hvp, hvp_map=m.hvp_map, task_threads=m.task_threads,
                                  graph_memory_mb=m.graph_memory_mb, fused_batch_norm=m.fused_batch_norm,
                                  step_hook=hook, **kw)  # type: ignore[arg-type]
