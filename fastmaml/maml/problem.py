"""The meta-learning problem, checked: what the reference and the fast MAML paths
share — the meta-batch and argument checks, the loss by name, the multi-step-loss
weights and the inner learning rate in each of its granularities.

Nothing here computes a meta-gradient; it turns user arguments into a checked,
normalised description (`MetaProblem`) that both paths read the same way, so they
cannot disagree on what an argument means.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastmaml import _checks

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
PureFn = Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]
LOSS_NAMES = ("mse", "cross_entropy")

def mse(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over points and output features (as ``F.mse_loss``, reduction='mean').

    Written out rather than calling ``F.mse_loss``: in torch 2.13 the forward-mode
    derivative of ``mse_loss_backward`` (needed by forward-over-reverse HVPs) fails
    with "ZeroTensors are immutable" when the target has no tangent."""
    if pred.shape != y.shape:
        raise ValueError(f"loss='mse': predictions {tuple(pred.shape)} and labels {tuple(y.shape)} must have the same shape")
    return (pred - y).square().mean()


def cross_entropy(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy of logits ``pred`` [N, C] with integer labels ``y`` [N]; mean over points."""
    return F.cross_entropy(pred, y)


def resolve_loss(loss: object) -> tuple[str, LossFn]:
    """``(name, fn)`` for a loss given by name or as a callable ``loss(pred, y) -> scalar``."""
    if isinstance(loss, str):
        if loss == "mse":
            return "mse", mse
        if loss == "cross_entropy":
            return "cross_entropy", cross_entropy
        raise ValueError(f"loss must be one of {LOSS_NAMES} or a callable loss(pred, y), got {loss!r}")
    if callable(loss):
        return "callable", _scalar_loss(loss)  # type: ignore[arg-type]
    raise TypeError(f"loss must be one of {LOSS_NAMES} or a callable loss(pred, y), got {type(loss).__name__}")


def _scalar_loss(loss: LossFn) -> LossFn:
    """``loss`` checked to return a scalar (0-d) on each call. A per-point loss would be
    silently wrong: the inner steps would differentiate its sum, the value report its
    mean. Under vmap the check sees one task's value, as it should."""

    def checked(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = loss(pred, y)
        if not isinstance(out, torch.Tensor) or out.dim() != 0:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"loss must return a scalar (a 0-d tensor, e.g. reduced by .mean()), got {shape}")
        return out

    return checked


@dataclass
class LRSpec:
    """The inner learning rate α, normalised (docs/DESIGN.md §1). ``kind`` is its
    granularity: 'fixed' (a Python float, not learned), 'scalar' (a 0-d tensor),
    'per_tensor' ([n_adapted]), 'per_step_layer' ([K, n_adapted], MAML++ LSLR),
    'per_element' (one [*shape_i] tensor per adapted tensor, Meta-SGD) or
    'per_step_element' (one [K, *shape_i] each). ``tensors`` are the (possibly learned)
    tensors in the user's order; ``value`` is the float when kind == 'fixed'."""

    kind: str
    tensors: list[torch.Tensor]
    value: float = 0.0

    # --- views of α at step k ---------------------------------------------------------
    def rate(self, k: int, i: int, tensors: Sequence[torch.Tensor] | None = None) -> float | torch.Tensor:
        """α_{k,i}: the rate of adapted tensor i at step k, broadcastable against a
        per-task ``[T, *shape_i]`` tensor. ``tensors`` replaces ``self.tensors`` (e.g.
        detached copies inside an autograd.Function)."""
        ts = self.tensors if tensors is None else tensors
        if self.kind == "fixed":
            return self.value
        if self.kind == "scalar":
            return ts[0]
        if self.kind == "per_tensor":
            return ts[0][i]
        if self.kind == "per_step_layer":
            return ts[0][k, i]
        if self.kind == "per_element":
            return ts[i]
        return ts[i][k]  # per_step_element

    def sgd_lr(self, k: int, tensors: Sequence[torch.Tensor] | None = None):
        """α at step k in the form ``ops.sgd_step`` takes (float, 0-d, 1-d [n] or a list)."""
        ts = self.tensors if tensors is None else tensors
        if self.kind == "fixed":
            return self.value
        if self.kind in ("scalar", "per_tensor"):
            return ts[0]
        if self.kind == "per_step_layer":
            return ts[0][k]
        if self.kind == "per_element":
            return list(ts)
        return [t[k] for t in ts]

    def reduce_grad(self, k: int, i: int, gv: torch.Tensor, acc: list[torch.Tensor]) -> None:
        """Add ``gv`` = ∂M/∂α_{k,i} per task and element ([T, *shape_i]) into the
        gradient buffers ``acc`` (same shapes as ``tensors``), reduced to α's granularity."""
        if self.kind == "fixed":
            return
        if self.kind == "scalar":
            acc[0] += gv.sum()
        elif self.kind == "per_tensor":
            acc[0][i] += gv.sum()
        elif self.kind == "per_step_layer":
            acc[0][k, i] += gv.sum()
        elif self.kind == "per_element":
            acc[i] += gv.sum(0)
        else:
            acc[i][k] += gv.sum(0)


def resolve_lr(lrs: object, shapes: Sequence[torch.Size], names: Sequence[str], steps: int,
               dtype: torch.dtype, device: torch.device) -> LRSpec:
    """Check ``lrs`` against the adapted tensors' shapes and return its granularity.

    lrs: a float (fixed); a 0-d tensor (scalar); a 1-d tensor [n_adapted] (one per
    tensor); a 2-d tensor [K, n_adapted] (MAML++ LSLR); or a sequence / mapping
    (name -> tensor) of per-element rates, each [*shape_i] or [K, *shape_i] (Meta-SGD).
    """
    n = len(shapes)
    if isinstance(lrs, bool):
        raise TypeError("lrs must be a float, a tensor or a sequence/dict of tensors, got bool")
    if isinstance(lrs, (int, float)):
        return LRSpec("fixed", [], _checks.inner_lr("lrs (a fixed inner learning rate)", lrs))
    if isinstance(lrs, torch.Tensor):
        _check_lr_tensor("lrs", lrs, dtype, device)
        if lrs.dim() == 0:
            return LRSpec("scalar", [lrs])
        if lrs.dim() == 1:
            _checks.shape("lrs (one rate per adapted tensor)", lrs, (n,))
            return LRSpec("per_tensor", [lrs])
        if lrs.dim() == 2:
            _checks.shape("lrs (per step and per adapted tensor, [K, n_adapted])", lrs, (steps, n))
            return LRSpec("per_step_layer", [lrs])
        raise ValueError(
            f"lrs as one tensor must be 0-d, [n_adapted]={n} or [K, n_adapted]=({steps}, {n}), got shape {tuple(lrs.shape)}"
        )
    if isinstance(lrs, Mapping):
        missing = [nm for nm in names if nm not in lrs]
        extra = [nm for nm in lrs if nm not in names]
        if missing or extra:
            raise ValueError(f"per-element lrs must have one entry per adapted tensor {list(names)}; "
                             f"missing {missing}, unexpected {extra}")
        seq = [lrs[nm] for nm in names]
    elif isinstance(lrs, Sequence) and not isinstance(lrs, str):
        seq = list(lrs)
        if len(seq) != n:
            raise ValueError(f"per-element lrs must hold one tensor per adapted tensor ({n}), got {len(seq)}")
    else:
        raise TypeError(f"lrs must be a float, a tensor or a sequence/dict of tensors, got {type(lrs).__name__}")
    kinds = set()
    for nm, t, shp in zip(names, seq, shapes):
        _checks.tensor(f"lrs[{nm!r}]", t)
        _check_lr_tensor(f"lrs[{nm!r}]", t, dtype, device)
        if tuple(t.shape) == tuple(shp):
            kinds.add("per_element")
        elif tuple(t.shape) == (steps, *shp):
            kinds.add("per_step_element")
        else:
            raise ValueError(f"lrs[{nm!r}] must have shape {tuple(shp)} (per element) or "
                             f"{(steps, *shp)} (per step and element), got {tuple(t.shape)}")
    if len(kinds) != 1:
        raise ValueError("per-element lrs must be all [*shape] or all [K, *shape], not a mix")
    return LRSpec(kinds.pop(), seq)


def _check_lr_tensor(name: str, t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> None:
    _checks.float_dtype(name, t, dtype)
    _checks.same_device(name, t, device)
    _checks.finite(name, t)


def resolve_msl(msl_weights: object, steps: int) -> list[float]:
    """The query-loss weights w_1..w_K as floats; None means plain MAML (w_K = 1, others 0)."""
    if msl_weights is None:
        return [0.0] * (steps - 1) + [1.0]
    if isinstance(msl_weights, torch.Tensor):
        if msl_weights.dim() != 1:
            raise ValueError(f"msl_weights must be 1-d [K]={steps}, got shape {tuple(msl_weights.shape)}")
        w = [float(x) for x in msl_weights.detach().cpu().tolist()]
    elif isinstance(msl_weights, Sequence) and not isinstance(msl_weights, str):
        w = []
        for x in msl_weights:
            if isinstance(x, bool) or not isinstance(x, (int, float)):
                raise TypeError(f"msl_weights must hold numbers, got {type(x).__name__}")
            w.append(float(x))
    else:
        raise TypeError(f"msl_weights must be None, a sequence of K floats or a 1-d tensor, got {type(msl_weights).__name__}")
    if len(w) != steps:
        raise ValueError(f"msl_weights must have one weight per inner step (K={steps}), got {len(w)}")
    if not all(math.isfinite(x) for x in w):
        raise ValueError(f"msl_weights must be finite, got {w}")
    return w


def check_meta_batch(xs: object, ys: object, xq: object, yq: object, *, loss_name: str,
                     dtype: torch.dtype, device: torch.device) -> int:
    """Check the meta-batch [T, N, ...] tensors; returns T.

    xs [T, Ns, ...], ys [T, Ns, ...], xq [T, Nq, ...], yq [T, Nq, ...]; the x's have
    the parameters' float dtype; labels are float (mse) or int64 (cross_entropy)."""
    for nm, t in (("xs", xs), ("xq", xq)):
        _checks.tensor(nm, t)
        if t.dim() < 3:  # type: ignore[union-attr]
            raise ValueError(
                f"{nm} must be [T, N, ...] (tasks, points, point features), got shape {tuple(t.shape)}: "  # type: ignore[union-attr]
                f"{t.dim()} dims, a task dimension is missing? For one task pass {nm}.unsqueeze(0) (and the "  # type: ignore[union-attr]
                "labels likewise); points need at least one feature dim ([T, N] scalars: unsqueeze(-1))")
    for nm, t in (("xs", xs), ("ys", ys), ("xq", xq), ("yq", yq)):
        _checks.tensor(nm, t)
        if t.dim() < 2:  # type: ignore[union-attr]
            raise ValueError(f"{nm} must be [T, N, ...] (tasks, points, ...), got shape {tuple(t.shape)}")  # type: ignore[union-attr]
        _checks.same_device(nm, t, device)  # type: ignore[arg-type]
    assert isinstance(xs, torch.Tensor) and isinstance(ys, torch.Tensor)
    assert isinstance(xq, torch.Tensor) and isinstance(yq, torch.Tensor)
    T = xs.shape[0]
    if T == 0:
        raise ValueError("the meta-batch is empty: xs has T = 0 tasks")
    for nm, t in (("ys", ys), ("xq", xq), ("yq", yq)):
        if t.shape[0] != T:
            raise ValueError(f"{nm} must hold T = {T} tasks like xs (dim 0), got {t.shape[0]} (shape {tuple(t.shape)})")
    if ys.shape[1] != xs.shape[1]:
        raise ValueError(f"ys must have as many support points as xs (dim 1): xs {tuple(xs.shape)}, ys {tuple(ys.shape)}")
    if yq.shape[1] != xq.shape[1]:
        raise ValueError(f"yq must have as many query points as xq (dim 1): xq {tuple(xq.shape)}, yq {tuple(yq.shape)}")
    if xs.shape[1] == 0 or xq.shape[1] == 0:
        raise ValueError(f"each task needs at least one support and one query point, got xs {tuple(xs.shape)}, xq {tuple(xq.shape)}")
    if xs.shape[2:] != xq.shape[2:]:
        raise ValueError(f"xs and xq must have the same point shape, got {tuple(xs.shape[2:])} and {tuple(xq.shape[2:])}")
    for nm, t in (("xs", xs), ("xq", xq)):
        _checks.float_dtype(nm, t, dtype)
        _checks.finite(nm, t)
    for nm, t in (("ys", ys), ("yq", yq)):
        if loss_name == "mse":
            _checks.float_dtype(nm, t, dtype)
        elif loss_name == "cross_entropy":
            if t.dtype != torch.int64:
                raise TypeError(f"{nm} must hold int64 class labels for loss='cross_entropy', got {t.dtype}")
            if t.numel() and torch.compiler.is_compiling():  # in-graph assert (RuntimeError), no .item() break
                torch._assert_async((t >= 0).all(), f"{nm} holds a negative class label")
            elif t.numel() and int(t.min()) < 0:
                raise ValueError(f"{nm} holds a negative class label ({int(t.min())})")
        if t.is_floating_point() or t.is_complex():
            _checks.finite(nm, t)
    if loss_name == "mse" and ys.shape[2:] != yq.shape[2:]:
        raise ValueError(f"ys and yq must have the same label shape, got {tuple(ys.shape[2:])} and {tuple(yq.shape[2:])}")
    return T


@dataclass
class MetaProblem:
    """A checked meta-step: which tensors are adapted, how, and with what loss."""

    names: list[str]            # every differentiable parameter, user order
    adapted: list[str]          # adapted in the inner loop
    fixed: list[str]            # held at θ in the inner loop (ANIL body)
    lr: LRSpec
    steps: int
    first_order: bool
    msl: list[float]            # w_1..w_K
    loss_name: str
    loss_fn: LossFn
    T: int


def check_problem(fn: object, params: object, lrs: object, xs: object, ys: object, xq: object, yq: object, *,
                  steps: object, first_order: object, loss: object, msl_weights: object,
                  adapt: object) -> MetaProblem:
    """Every check of :func:`fastmaml.maml_loss`'s arguments, in one place."""
    if not callable(fn):
        raise TypeError(f"fn must be a callable fn(params, x), got {type(fn).__name__}")
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict name -> tensor, got {type(params).__name__}")
    if len(params) == 0:
        raise ValueError("params is empty")
    names = list(params.keys())
    dtype = device = None
    for nm in names:
        p = _checks.tensor(f"params[{nm!r}]", params[nm])
        if dtype is None:
            dtype, device = p.dtype, p.device
        _checks.float_dtype(f"params[{nm!r}]", p, dtype)
        _checks.same_device(f"params[{nm!r}]", p, device)  # type: ignore[arg-type]
        _checks.finite(f"params[{nm!r}]", p)
    assert dtype is not None and device is not None
    K = _checks.positive_int("steps", steps)
    if not isinstance(first_order, bool):
        raise TypeError(f"first_order must be a bool, got {type(first_order).__name__}")
    if adapt is None:
        adapted = list(names)
    else:
        if isinstance(adapt, str) or not isinstance(adapt, Sequence) and not isinstance(adapt, (set, frozenset)):
            raise TypeError(f"adapt must be None or a list of parameter names, got {type(adapt).__name__}")
        wanted = list(adapt)
        unknown = [a for a in wanted if a not in params]
        if unknown:
            raise ValueError(f"adapt names unknown parameters {unknown}; the parameters are {names}")
        if not wanted:
            raise ValueError("adapt must name at least one parameter to adapt in the inner loop")
        adapted = [nm for nm in names if nm in set(wanted)]  # keep the params' order
    fixed = [nm for nm in names if nm not in set(adapted)]
    loss_name, loss_fn = resolve_loss(loss)
    T = check_meta_batch(xs, ys, xq, yq, loss_name=loss_name, dtype=dtype, device=device)
    lr = resolve_lr(lrs, [params[nm].shape for nm in adapted], adapted, K, dtype, device)  # type: ignore[index]
    msl = resolve_msl(msl_weights, K)
    return MetaProblem(names, adapted, fixed, lr, K, first_order, msl, loss_name, loss_fn, T)


def check_model(model: nn.Module) -> None:
    """Raise ValueError for model states the meta-step cannot handle, naming the layer:
    a norm layer (BatchNorm, InstanceNorm) that would update running statistics
    (training mode with track_running_stats=True) and active dropout (random masks
    differ between the inner loop, the query loss and the backward's recomputation)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats:
            raise ValueError(
                f"{type(m).__name__} layer {name!r} is in training mode with track_running_stats=True: it would update "
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
