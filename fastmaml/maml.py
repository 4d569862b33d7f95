"""Public MAML API (DESIGN.md §2): the ``MAML`` module wrapper and the functional
``maml_loss``.

The meta-loss returned by either is once-differentiable on the fast path: its
backward is the adjoint recursion (DESIGN.md §1) run without a graph, so
``loss.backward()`` works but differentiating the meta-gradient again (double
backward, e.g. ``autograd.grad(loss, θ, create_graph=True)`` then ``.backward()``)
raises a RuntimeError. Use ``backend="reference"`` if you need higher derivatives.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from fastmaml import _checks, generic, mlp_route
from fastmaml import reference as ref
from fastmaml._maml_common import PureFn, resolve_loss, resolve_msl
from fastmaml.annealing import OrderSchedule
from fastmaml.nn import StepSchedule
from fastmaml.reference import per_step_bn as ref_per_step

LR_MODES = ("scalar", "per_step_layer", "per_element", "per_step_element")
MAML_BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")


def _check_backend(backend: object) -> str:
    if not isinstance(backend, str) or backend not in MAML_BACKENDS:
        raise ValueError(f"backend must be one of {MAML_BACKENDS}, got {backend!r}")
    return backend


def maml_loss(
    fn: PureFn,
    params: Mapping[str, torch.Tensor],
    lrs: object,
    xs: torch.Tensor,
    ys: torch.Tensor,
    xq: torch.Tensor,
    yq: torch.Tensor,
    *,
    steps: int,
    first_order: bool = False,
    loss: object = "mse",
    msl_weights: object = None,
    adapt: Sequence[str] | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Meta-loss M = (1/T) Σ_t Σ_k w_k Lq(θ_{t,k}) of a pure function ``fn(params, x)``.

    ``fn`` may also be an ``nn.Module`` (called as ``functional_call(fn, params, (x,))``):
    then an ``nn.Sequential`` MLP of Linear and ReLU/Tanh takes the fused MLP op by
    itself (see :mod:`fastmaml.mlp_route`), like ``fastmaml.MAML`` does.

    params: dict name -> tensor θ (float32/float64), shared by the tasks.
    lrs: float (fixed) | 0-d tensor (scalar, learned if it requires grad) |
        [n_adapted] | [K, n_adapted] (MAML++ LSLR) | list/dict of per-element tensors
        [*shape_i] or [K, *shape_i] (Meta-SGD), ordered like the adapted tensors.
    xs [T, Ns, ...], ys [T, Ns, ...] (float for 'mse', int64 for 'cross_entropy'),
    xq [T, Nq, ...], yq [T, Nq, ...].
    steps: K; first_order; loss: 'mse' | 'cross_entropy' | loss(pred, y); msl_weights:
    [K] or None; adapt: names adapted in the inner loop (None: all).
    backend: 'reference' (unrolled autograd, ground truth) or 'auto'/'cpu'/'cuda'/
    'triton' (generic fast path; the name picks ``ops.sgd_step``'s backend).
    Returns a 0-d tensor; once-differentiable on the fast path.
    """
    backend = _check_backend(backend)
    kw = dict(steps=steps, first_order=first_order, loss=loss, msl_weights=msl_weights, adapt=adapt)
    if isinstance(fn, nn.Module):
        module = fn
        if isinstance(params, Mapping) and backend != "reference":
            st_ok = _fused_route_for(module, params, lrs, adapt, loss, msl_weights, steps, xs, ys, xq, backend)
            if st_ok is not None:
                msl = mlp_route.msl_tensor(_msl_list(msl_weights, steps), params[st_ok.weight_names[0]])
                return mlp_route.run(st_ok, [params[n] for n in st_ok.weight_names],
                                     [params[n] for n in st_ok.bias_names], lrs, xs, ys, xq, yq, steps=steps,
                                     first_order=first_order, loss=loss, msl_weights=msl,  # type: ignore[arg-type]
                                     backend=backend)

        def fn(p: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(module, dict(p), (x,))

    if backend == "reference":
        return ref.maml_loss(fn, params, lrs, xs, ys, xq, yq, **kw)  # type: ignore[arg-type]
    return generic.maml_loss(fn, params, lrs, xs, ys, xq, yq, backend=backend, **kw)  # type: ignore[arg-type]


def _msl_list(msl_weights: object, steps: int) -> list[float] | None:
    return None if msl_weights is None else resolve_msl(msl_weights, steps)


def _lr_learned(lrs: object) -> bool:
    if isinstance(lrs, torch.Tensor):
        return lrs.requires_grad
    if isinstance(lrs, Mapping):
        lrs = list(lrs.values())
    if isinstance(lrs, (list, tuple)):
        return any(isinstance(t, torch.Tensor) and t.requires_grad for t in lrs)
    return False


def _fused_route_for(module: nn.Module, params: Mapping[str, torch.Tensor], lrs: object, adapt: object, loss: object,
                     msl_weights: object, steps: int, xs: object, ys: object, xq: object,
                     backend: str) -> mlp_route.MlpModel | None:
    """The MLP structure when ``maml_loss`` called with a module takes the MLP route."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        return None  # the generic path reports it
    adapted = list(params) if adapt is None else list(adapt)  # type: ignore[call-overload]
    msl = _msl_list(msl_weights, steps)
    n_msl = 1 if msl is None else sum(1 for w in msl if w != 0.0)
    which, _, st = mlp_route.route(module, params, adapted, loss, _lr_learned(lrs) and torch.is_grad_enabled(),
                                   n_msl, steps, xs, ys, xq, backend)  # type: ignore[arg-type]
    return st if which is not None else None


def _has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())


class MAML(nn.Module):
    """MAML and its relatives around any ``nn.Module`` that is a function of its
    parameters (Linear, Conv, BatchNorm with batch statistics, activations, pooling).

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
            so any optimizer over ``self.parameters()`` trains them. For non-scalar
            modes without learn_lr they are frozen parameters.
        loss: 'mse' | 'cross_entropy' | callable loss(pred, y) -> scalar.
        adapt: names (as in ``model.named_parameters()``) adapted in the inner loop;
            None = all trainable parameters (ANIL: the head only).
        msl_weights: MAML++ multi-step-loss weights [K], None = plain MAML.
        backend: 'auto' | 'reference' | 'cpu' | 'cuda' | 'triton' (see ``maml_loss``).
        first_order_until: MAML++ derivative-order annealing: an int E (first order for
            the first E outer steps, then second) or a callable schedule(outer_step) ->
            bool (True: first order); see :mod:`fastmaml.annealing`. Needs
            first_order=False.

    ``fastmaml.nn.PerStepBatchNorm2d`` layers get the step index (support forward at
    step k and query after step k: entry k; ``predict``: entry K−1); their per-step
    running statistics are updated once per outer step, after the inner loop.

    ``self(xs, ys, xq, yq)`` returns the meta-loss (0-d); ``.backward()`` on it fills
    ``.grad`` of θ and of learned rates. It is once-differentiable on the fast path.
    ``self.path`` / ``self.path_reason`` say which implementation ran and why.
    """

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float = 0.01,
        inner_steps: int = 5,
        first_order: bool = False,
        lr_mode: str = "scalar",
        learn_lr: bool = False,
        loss: object = "mse",
        adapt: Sequence[str] | None = None,
        msl_weights: object = None,
        backend: str = "auto",
        first_order_until: object = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.inner_steps = _checks.positive_int("inner_steps", inner_steps)
        self._order = OrderSchedule(first_order, first_order_until)  # type: ignore[arg-type]
        self.first_order = first_order
        self._steps = StepSchedule(model, self.inner_steps)  # per-step layers (MAML++ BNWB/BNRS)
        if lr_mode not in LR_MODES:
            raise ValueError(f"lr_mode must be one of {LR_MODES}, got {lr_mode!r}")
        self.lr_mode = lr_mode
        if not isinstance(learn_lr, bool):
            raise TypeError(f"learn_lr must be a bool, got {type(learn_lr).__name__}")
        self.learn_lr = learn_lr
        if isinstance(inner_lr, bool) or not isinstance(inner_lr, (int, float)) or not math.isfinite(inner_lr):
            raise ValueError(f"inner_lr must be a finite float, got {inner_lr!r}")
        self.inner_lr = float(inner_lr)
        resolve_loss(loss)
        self.loss = loss
        self.msl_weights = None if msl_weights is None else resolve_msl(msl_weights, self.inner_steps)
        self.backend = _check_backend(backend)

        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("model has no trainable parameters (requires_grad=True)")
        names = [n for n, _ in named]
        if adapt is None:
            self.adapt_names = names
        else:
            if isinstance(adapt, str):
                raise TypeError("adapt must be a list of parameter names, not a string")
            unknown = [a for a in adapt if a not in names]
            if unknown:
                raise ValueError(f"adapt names unknown or frozen parameters {unknown}; trainable parameters: {names}")
            if not list(adapt):
                raise ValueError("adapt must name at least one parameter")
            self.adapt_names = [n for n in names if n in set(adapt)]
        p0 = named[0][1]
        shapes = [dict(named)[n].shape for n in self.adapt_names]
        K, n_a = self.inner_steps, len(self.adapt_names)
        kw = dict(dtype=p0.dtype, device=p0.device)
        if lr_mode == "scalar":
            lrs = [torch.tensor(self.inner_lr, **kw)] if learn_lr else []  # type: ignore[arg-type]
        elif lr_mode == "per_step_layer":
            lrs = [torch.full((K, n_a), self.inner_lr, **kw)]  # type: ignore[arg-type]
        elif lr_mode == "per_element":
            lrs = [torch.full(s, self.inner_lr, **kw) for s in shapes]  # type: ignore[arg-type]
        else:
            lrs = [torch.full((K, *s), self.inner_lr, **kw) for s in shapes]  # type: ignore[arg-type]
        self.lrs = nn.ParameterList([nn.Parameter(t, requires_grad=learn_lr) for t in lrs])
        # Advanced knobs of the generic path (see fastmaml.generic): how tasks are mapped
        # ('auto' | 'vmap' | 'loop') and how HVPs are taken ('auto' | 'autograd' |
        # 'rev_rev' | 'fwd_rev'). The defaults are the fastest measured on CPU.
        self.task_map = "auto"
        self.hvp = "auto"
        # How many tasks the CPU per-task loop runs at once ('auto' | int) and how much
        # memory the earlier steps' support graphs may keep (MiB; 0: recompute them).
        self.task_threads: int | str = "auto"
        self.graph_memory_mb = generic.GRAPH_MEMORY_MB
        # Batch-statistics BatchNorm by fastmaml's fused kernels in the CPU per-task loop
        # (fastmaml.batch_norm: closed-form double backward); False: PyTorch's.
        self.fused_batch_norm = True
        self.check_model()
        self.path, self.path_reason = self._select_path(p0.device)
        self._route_cache: dict = {}
        self._msl_tensor = None if self.msl_weights is None else mlp_route.msl_tensor(self.msl_weights, p0)

    # --- the pieces the paths share ---------------------------------------------------
    def check_model(self) -> None:
        """Raise ValueError for model states the meta-step cannot handle:
        BatchNorm that would update running statistics (training mode with
        track_running_stats=True) and active dropout (random masks differ between the
        inner loop, the query loss and the backward's recomputation)."""
        for name, m in self.model.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats:
                raise ValueError(
                    f"BatchNorm layer {name!r} is in training mode with track_running_stats=True: it would update "
                    "its running statistics (buffers) in place inside the inner loop. Build it with "
                    "track_running_stats=False (batch statistics, as the original MAML code), or call "
                    "model.eval() to use its fixed running statistics."
                )
            if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
                raise ValueError(
                    f"Dropout layer {name!r} is active (training mode, p={m.p}): its random masks would differ "
                    "between the inner steps, the query loss and the backward pass. Call model.eval() on the "
                    "dropout layers or use p=0."
                )

    def _params(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def _fn(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(self.model, params, (x,))

    def _lrs_arg(self) -> object:
        if self.lr_mode == "scalar":
            return self.lrs[0] if self.learn_lr else self.inner_lr
        if self.lr_mode == "per_step_layer":
            return self.lrs[0]
        return list(self.lrs)

    def _task_map(self, device: torch.device) -> str:
        if self.task_map != "auto":
            return self.task_map
        # CPU convolutions: one ordinary conv per task beats vmap's grouped conv.
        return "loop" if (device.type == "cpu" and _has_conv(self.model)) else "vmap"

    def _select_path(self, device: torch.device) -> tuple[str, str]:
        """Which generic implementation runs the meta-step, and why. ``forward`` first
        asks :func:`fastmaml.mlp_route.route` whether the fused MLP op applies (it
        needs the data's shapes), and takes it when it does."""
        if self.backend == "reference":
            return "reference", "backend='reference' requested: unrolled autograd over a loop of tasks"
        tm = self._task_map(device)
        hv = "autograd" if self.hvp == "auto" else self.hvp
        why = (f"vmap over tasks, {hv} HVPs" if tm == "vmap"
               else f"loop over tasks, {hv} HVPs (CPU convolutions: a per-task conv is faster than vmap's "
                    f"grouped conv; the backward's HVPs are vmapped over tasks when the support sets are small, "
                    f"<= {generic.SMALL_SUPPORT} points per task)")
        return "generic", f"generic adjoint path: {why}"

    def _mlp_plan(self, xs: object, ys: object, xq: object
                  ) -> tuple[mlp_route.MlpModel, list[torch.Tensor], list[torch.Tensor]] | None:
        """The MLP route for this call: (structure, weights, biases), or None for the
        generic/reference paths. The decision depends on the model's structure, which
        parameters are trainable, the data shapes, dtype, device and grad mode; it is
        cached on exactly those (a few µs per call instead of walking the module tree),
        and sets ``path``/``path_reason``."""
        model = self.model
        if self.backend == "reference" or not isinstance(model, nn.Sequential):
            return None
        if not (isinstance(xs, torch.Tensor) and isinstance(ys, torch.Tensor) and isinstance(xq, torch.Tensor)):
            return None
        mods = tuple(model._modules.values())
        ws: list = []
        bs: list = []
        for m in mods:
            if isinstance(m, nn.Linear):
                # the registered Parameters straight from the dict (Module.__getattr__ is a
                # Python call per lookup); a parametrized weight is not in it: attribute access
                d = m._parameters
                w = d.get("weight")
                ws.append(w if w is not None else m.weight)
                bs.append(d["bias"] if "bias" in d else m.bias)
        flags = tuple(w.requires_grad for w in ws) + tuple(b is not None and b.requires_grad for b in bs)
        w0 = ws[0] if ws else None
        grad_on = torch.is_grad_enabled()
        key = (mods, flags, xs.shape, ys.shape, xq.shape, xs.dtype,
               None if w0 is None else (w0.dtype, w0.device), grad_on, tuple(p.requires_grad for p in self.lrs))
        hit = self._route_cache.get(key)
        if hit is None:
            n_msl = 1 if self.msl_weights is None else sum(1 for w in self.msl_weights if w != 0.0)
            which, why, st = mlp_route.route(model, self._params(), self.adapt_names, self.loss,
                                             self.learn_lr and grad_on, n_msl, self.inner_steps, xs, ys, xq,
                                             self.backend)  # type: ignore[arg-type]
            hit = (which, why, st if which is not None else None)
            if len(self._route_cache) > 64:
                self._route_cache.clear()
            self._route_cache[key] = hit
        which, why, st = hit
        if st is None:
            return None
        if self.path is not which or self.path_reason is not why:  # nn.Module.__setattr__ is slow
            self.path, self.path_reason = which, why  # type: ignore[assignment]
        return st, ws, bs

    def _buffer_versions(self) -> list[int]:
        exempt = self._steps.running_buffers()  # per-step running statistics: updated after the inner loop
        return [b._version for b in self.model.buffers() if id(b) not in exempt]

    @property
    def outer_steps(self) -> int:
        """Outer steps so far (training-mode calls with grad enabled; see annealing)."""
        return self._order.outer_steps

    @outer_steps.setter
    def outer_steps(self, n: int) -> None:
        self._order.outer_steps = _checks.positive_int("outer_steps", n, minimum=0)

    # --- public -------------------------------------------------------------------------
    def forward(self, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, yq: torch.Tensor) -> torch.Tensor:
        """Meta-loss of the meta-batch xs [T, Ns, ...], ys, xq [T, Nq, ...], yq (0-d)."""
        record = bool(self._steps) and self._order.counts(self.training) and self._steps.recording
        self._order.first_order = self.first_order  # the attribute may be changed after construction
        first_order = self._order.next(self.training)
        mlp = None if self._steps else self._mlp_plan(xs, ys, xq)
        if mlp is not None:
            st, ws, bs = mlp
            msl = self._msl_tensor
            if msl is not None and (msl.dtype != ws[0].dtype or msl.device != ws[0].device):
                msl = self._msl_tensor = mlp_route.msl_tensor(self.msl_weights, ws[0])
            return mlp_route.run(st, ws, bs, self._lrs_arg(), xs, ys, xq, yq, steps=self.inner_steps,
                                 first_order=first_order, loss=self.loss, msl_weights=msl,
                                 backend=self.backend)  # type: ignore[arg-type]
        self.check_model()
        params = self._params()
        device = next(iter(params.values())).device
        self.path, self.path_reason = self._select_path(device)
        versions = self._buffer_versions()
        kw = dict(steps=self.inner_steps, first_order=first_order, loss=self.loss,
                  msl_weights=self.msl_weights, adapt=self.adapt_names)
        if record:
            self._steps.begin()
        if self.path == "reference" and self._steps:
            out = ref_per_step.maml_loss(self.model, self._params(), self._lrs_arg(), xs, ys, xq, yq,
                                         update_running_stats=record, **kw)  # type: ignore[arg-type]
        elif self.path == "reference":
            out = ref.maml_loss(self._fn, self._params(), self._lrs_arg(), xs, ys, xq, yq, **kw)  # type: ignore[arg-type]
        else:
            fn = generic.module_fn(self.model)  # safe to call from the task workers
            # recording per-task batch statistics needs plain per-task tensors: the task loop
            out = generic.maml_loss(fn, self._params(), self._lrs_arg(), xs, ys, xq, yq,
                                    backend=self.backend, task_map="loop" if record else self._task_map(device),
                                    hvp=self.hvp, task_threads=self.task_threads,
                                    graph_memory_mb=self.graph_memory_mb, fused_batch_norm=self.fused_batch_norm,
                                    step_hook=self._steps.hook(record) if self._steps else None,
                                    **kw)  # type: ignore[arg-type]
        if record:
            self._steps.end()
        if self._buffer_versions() != versions:
            raise RuntimeError("the model modified one of its buffers in place during forward; MAML needs a model "
                               "whose forward is a pure function of its parameters and inputs")
        return out

    def adapt(self, xs: torch.Tensor, ys: torch.Tensor, steps: int | None = None) -> dict[str, torch.Tensor]:
        """Per-task adapted parameters after ``steps`` (default K) inner steps on the
        support sets xs [T, N, ...], ys: dict name -> [T, *shape], detached (for
        evaluation). Per-step learning rates allow only steps == K."""
        self.check_model()
        steps = self.inner_steps if steps is None else _checks.positive_int("steps", steps)
        device = next(iter(self._params().values())).device
        if self.lr_mode in ("per_step_layer", "per_step_element") and steps != self.inner_steps:
            raise ValueError(f"lr_mode={self.lr_mode!r} defines rates for {self.inner_steps} steps only; got steps={steps}")
        kw = dict(steps=steps, loss=self.loss, adapt=self.adapt_names)
        if self._select_path(device)[0] == "reference" and not self._steps:
            return ref.maml_adapt(self._fn, self._params(), self._lrs_arg(), xs, ys, **kw)  # type: ignore[arg-type]
        return generic.adapt(generic.module_fn(self.model), self._params(), self._lrs_arg(), xs, ys,
                             backend=self.backend, task_map=self._task_map(device), task_threads=self.task_threads,
                             fused_batch_norm=self.fused_batch_norm,
                             step_hook=self._steps.hook(False) if self._steps else None, **kw)  # type: ignore[arg-type]

    def predict(self, fast: Mapping[str, torch.Tensor], xq: torch.Tensor) -> torch.Tensor:
        """Predictions of each task's adapted parameters ``fast`` (from ``adapt``) on
        xq [T, N, ...]: [T, N, ...]."""
        if not isinstance(fast, Mapping):
            raise TypeError(f"fast must be the dict returned by adapt(), got {type(fast).__name__}")
        _checks.tensor("xq", xq)
        if xq.dim() < 2:
            raise ValueError(f"xq must be [T, N, ...], got shape {tuple(xq.shape)}")
        for n, p in fast.items():
            if p.dim() == 0 or p.shape[0] != xq.shape[0]:
                raise ValueError(f"fast[{n!r}] must be [T={xq.shape[0]}, ...] like xq, got shape {tuple(p.shape)}")
        device = xq.device
        self._steps.set_step(self.inner_steps - 1)  # per-step layers: the last step's entry
        return generic.predict(generic.module_fn(self.model), fast, xq, task_map=self._task_map(device),
                               task_threads=self.task_threads)
