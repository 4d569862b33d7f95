"""Which implementation runs a meta-step, and why: the one router of the MAML layer.

Both front ends — the ``MAML`` module and the functional ``maml_loss`` — call
:func:`route`, so they take the same path for the same model and data:

* ``"reference"``: ``backend='reference'``, unrolled autograd over a loop of tasks
  (also taken when inputs or closed-over tensors need gradients:
  :func:`fastmaml.maml.functional.upstream_route`);
* ``"fused_mlp"`` / ``"mlp_layerwise"``: an ``nn.Sequential`` MLP that the fused MLP op
  takes (:mod:`fastmaml.maml.mlp_path`), within or past its fused limits;
* ``"generic"``: the adjoint meta-step (:mod:`fastmaml.maml.adjoint`) for any model
  that is a pure function of its parameters, with its tasks mapped by :func:`choose_task_map`.

The task-map rule (one for both front ends): the per-task loop on CPU when the model
convolves — a module with a convolution layer, or, for a plain function ``fn(params,
x)``, image-shaped points (xs of 5+ dims, [T, N, C, H, W]) — since one ordinary
convolution per task beats vmap's grouped convolution there; vmap otherwise (MLPs and
other small dense models, whose per-task work is tiny and overhead-bound).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fastmaml.maml import mlp_path
from fastmaml.ops._batch_norm import available as fused_bn_available
from fastmaml.maml.tasks import TASK_MAPS

PROVISIONAL = "provisional (before the first call, for data that fit): "

# Support sets of at most this many points per task count as "small" for the choice of
# the backward's HVP map (see choose_hvp_map).
SMALL_SUPPORT = 16

# Default memory for keeping the support graphs of the inner steps before the last one
# (per-task loop): a kept graph saves recomputing that step's support forward and
# backward in the meta-backward. It bounds the graphs held at one time: those of all T
# tasks when tasks run concurrently, one task's when they run one at a time (so large
# inputs at large K recompute, and their memory stays one step's activations).
GRAPH_MEMORY_MB = 640.0


@dataclass(frozen=True)
class Route:
    """The router's answer: ``path`` ('fused_mlp' | 'mlp_layerwise' | 'generic' |
    'reference'), ``reason`` (why), and the plan of that path: the MLP structure (``mlp``, MLP paths) or the task map (generic)."""

    path: str
    reason: str
    mlp: mlp_path.MlpModel | None = None
    task_map: str = ""


def has_conv(model: object) -> bool:
    return isinstance(model, nn.Module) and any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())


def choose_task_map(task_map: str, model: object, xs: torch.Tensor | None, device: torch.device) -> str:
    """The one task-map rule (module docstring). ``model``: the module, or None for a
    plain function; ``xs``: the support inputs (None before the first call)."""
    if task_map not in TASK_MAPS:
        raise ValueError(f"task_map must be one of {TASK_MAPS}, got {task_map!r}")
    if task_map != "auto":
        return task_map
    if isinstance(model, nn.Module):
        convolves = has_conv(model)
    else:
        convolves = xs is not None and xs.dim() >= 5
    return "loop" if device.type == "cpu" and convolves else "vmap"


def choose_hvp_map(hvp_map: str, task_map: str, xs: torch.Tensor) -> str:
    """'' (= the task map) or the map of the backward's HVPs. 'auto' keeps the task map,
    except for the per-task loop over images on CPU with small support sets (at most
    ``SMALL_SUPPORT`` points per task): each task's HVP is then a few hundred tiny,
    overhead-bound ops, and one vmapped HVP over the tasks runs them once (grouped
    convolutions on large images lose, so larger support sets keep the loop). Only the
    steps whose support graph was not kept recompute an HVP, so the choice matters only
    for those."""
    if hvp_map not in TASK_MAPS:
        raise ValueError(f"hvp_map must be one of {TASK_MAPS}, got {hvp_map!r}")
    if hvp_map != "auto":
        return hvp_map
    if task_map == "loop" and xs.device.type == "cpu" and xs.dim() >= 5 and xs.shape[1] <= SMALL_SUPPORT:
        return "vmap"
    return ""


def choose_fused_bn(fused: bool, task_map: str, xs: torch.Tensor) -> bool:
    """The fused BatchNorm applies to the per-task loop (vmap has no rule for it) on
    CPU with the extension built."""
    if not isinstance(fused, bool):
        raise TypeError(f"fused_batch_norm must be a bool, got {type(fused).__name__}")
    return fused and task_map == "loop" and xs.device.type == "cpu" and fused_bn_available()


def choose_channels_last(fused_bn: bool, task_map: str, fn: object, xs: torch.Tensor) -> bool:
    """Whether the per-task loop runs image tasks (xs [T, N, C, H, W]) in channels_last
    layout (docs/DESIGN.md §1, "Channels-last image tasks"): where the fused BatchNorm
    runs (it takes channels_last tensors as they are; PyTorch's CPU BatchNorm is slow on
    them) and ``fn`` is a module's whose layers all run correctly on channels_last
    tensors (``module_fn``'s ``channels_last_safe``: plain Conv2d, BatchNorm2d,
    activations, pooling, Flatten, Linear; a plain function is not inspected, so never),
    for images of any number of channels (the images carry the layout into the first
    convolution; see :func:`tasks_channels_last` for one-channel images)."""
    return (fused_bn and task_map == "loop" and xs.dim() == 5 and xs.device.type == "cpu"
            and getattr(fn, "channels_last_safe", False) is True)


def tasks_channels_last(x: torch.Tensor) -> torch.Tensor:
    """x [T, N, C, H, W] (any strides) with every task's x[t] a channels_last tensor, by
    strides as well as by memory order. A one-channel image is NCHW and channels_last at
    once, and PyTorch reads its layout from the strides (a C stride of H·W means NCHW):
    it gets the channels_last C stride of 1, which addresses the same elements (C has one
    index) but makes the first convolution run, and return its output, channels_last."""
    y = x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    if y.shape[2] == 1:
        st = y.stride()
        y = y.as_strided(y.shape, (st[0], st[1], 1, st[3], st[4]))
    return y


def graph_budget(mb: float) -> int:
    if isinstance(mb, bool) or not isinstance(mb, (int, float)) or not mb >= 0 or mb == float("inf"):
        raise ValueError(f"graph_memory_mb must be a finite number >= 0, got {mb!r}")
    return int(mb * 2**20)


def _generic_reason(task_map: str, hvp: str) -> str:
    hv = "autograd" if hvp == "auto" else hvp
    if task_map == "vmap":
        return f"generic adjoint path: vmap over tasks, {hv} HVPs"
    return (f"generic adjoint path: loop over tasks, {hv} HVPs (CPU convolutions: a per-task conv is faster than "
            f"vmap's grouped conv; the backward's HVPs are vmapped over tasks when the support sets are small, "
            f"<= {SMALL_SUPPORT} points per task)")


# The one cache: per model (weakly held), the routes by everything they depend on.
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_CACHE_SIZE = 64


def route(model: object, params: Mapping[str, torch.Tensor], adapted: Sequence[str], *, loss: object,
          lr_learned: bool, n_msl: int, steps: object, data: tuple | None, backend: str, task_map: str = "auto",
          hvp: str = "auto", key: tuple | None = None) -> Route:
    """The path for a meta-step of ``model`` (an ``nn.Module``, or a plain function)
    on ``params`` (the differentiable tensors, or a function giving them), adapting ``adapted``; ``data`` =
    (xs, ys, xq), or None before the first call (the path for data that fit, its reason
    marked provisional). With ``key`` (everything else the answer depends on, see
    ``MAML``) the answer is cached per model."""
    if key is not None and isinstance(model, nn.Module):
        per_model = _CACHE.get(model)
        hit = None if per_model is None else per_model.get(key)
        if hit is not None:
            return hit
    if callable(params) and not isinstance(params, Mapping):
        params = params()  # a function giving them: called only on a cache miss
    out = _route(model, params, adapted, loss, lr_learned, n_msl, steps, data, backend, task_map, hvp)
    # Not filled while Dynamo traces: the cache's new entry would change the guarded
    # state and cost one recompile at the next call (docs/DESIGN.md §7).
    if key is not None and isinstance(model, nn.Module) and not torch.compiler.is_compiling():
        per_model = _CACHE.setdefault(model, {})
        if len(per_model) >= _CACHE_SIZE:
            per_model.clear()
        per_model[key] = out
    return out


def _device(params: Mapping[str, torch.Tensor]) -> torch.device:
    for p in params.values():
        if isinstance(p, torch.Tensor):
            return p.device
    return torch.device("cpu")  # the checks report it


def _route(model: object, params: Mapping[str, torch.Tensor], adapted: Sequence[str], loss: object,
           lr_learned: bool, n_msl: int, steps: object, data: tuple | None, backend: str, task_map: str,
           hvp: str) -> Route:
    pre = PROVISIONAL if data is None else ""
    if backend == "reference":
        return Route("reference", pre + "backend='reference' requested: unrolled autograd over a loop of tasks")
    why_not = "a plain function fn(params, x), not a module"
    if isinstance(model, nn.Module):
        if isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1:  # else the generic path reports it
            which, why, st = mlp_path.mlp_route(model, params, adapted, loss, lr_learned, n_msl, steps, data,
                                                backend)
            if which is not None:
                return Route(which, pre + why, st)
            why_not = why
        else:
            why_not = f"steps={steps!r}"
    xs = None if data is None else data[0]
    device = xs.device if isinstance(xs, torch.Tensor) else _device(params)
    tm = choose_task_map(task_map, model, xs if isinstance(xs, torch.Tensor) else None, device)
    return Route("generic", f"{pre}{_generic_reason(tm, hvp)}; not the fused MLP op: {why_not}", None, tm)
