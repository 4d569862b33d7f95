"""Argument checks and the choice of the task model (fused MLP ops or the generic
path) shared by iMAML and Reptile."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from fastmaml import _checks
from fastmaml.maml.problem import check_meta_batch, resolve_loss
from fastmaml.maml.tasks import choose_workers, module_fn
from fastmaml.family.tasks import GenericTasks, MlpTasks, mlp_tasks
from fastmaml.nn import PerStepBatchNorm2d

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")
TASK_MAPS = ("auto", "vmap", "loop")
HVPS = ("auto", "autograd", "fwd_rev")


def positive_float(name: str, v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    return float(v)


def nonneg_float(name: str, v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    return float(v)


def check_choice(name: str, v: object, choices: Sequence[str]) -> str:
    if not isinstance(v, str) or v not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {v!r}")
    return v


def check_model(model: nn.Module, algo: str) -> None:
    """Raise ValueError for model states whose forward is not a function of the
    parameters (BatchNorm updating running statistics, active dropout), and for
    step-indexed layers, which only ``fastmaml.MAML`` feeds."""
    for name, m in model.named_modules():
        if isinstance(m, PerStepBatchNorm2d):
            raise ValueError(f"layer {name!r} is a PerStepBatchNorm2d: its step index is fed by fastmaml.MAML's "
                             f"inner loop; {algo} has no per-step layers (use nn.BatchNorm2d with "
                             "track_running_stats=False)")
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats:
            raise ValueError(f"BatchNorm layer {name!r} is in training mode with track_running_stats=True: it would "
                             "update its running statistics inside the inner loop; build it with "
                             "track_running_stats=False or call model.eval()")
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
            raise ValueError(f"Dropout layer {name!r} is active (training mode, p={m.p}); call model.eval() on it "
                             "or use p=0")


def check_params(params: object) -> tuple[list[str], torch.dtype, torch.device]:
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict name -> tensor, got {type(params).__name__}")
    if not params:
        raise ValueError("params is empty")
    names = list(params)
    p0 = _checks.tensor(f"params[{names[0]!r}]", params[names[0]])
    for nm in names:
        p = _checks.tensor(f"params[{nm!r}]", params[nm])
        _checks.float_dtype(f"params[{nm!r}]", p, p0.dtype)
        _checks.same_device(f"params[{nm!r}]", p, p0.device)
        _checks.finite(f"params[{nm!r}]", p)
    return names, p0.dtype, p0.device


def select_tasks(fn: object, params: Mapping[str, torch.Tensor], xs: torch.Tensor, ys: torch.Tensor,
                 xq: torch.Tensor | None, yq: torch.Tensor | None, *, loss: object, backend: str,
                 task_map: str, hvp: str) -> MlpTasks | GenericTasks:
    """Check the meta-batch and pick the task model: the fused MLP ops when ``fn`` is an
    ``nn.Sequential`` MLP they cover (and ``task_map``/``hvp`` are 'auto'), else the
    generic path (``task_map`` 'auto': a loop over tasks for images on the CPU, where
    one convolution per task beats vmap's grouped convolution, else vmap)."""
    names, dtype, device = check_params(params)
    loss_name, loss_fn = resolve_loss(loss)
    check_choice("backend", backend, BACKENDS)
    check_choice("task_map", task_map, TASK_MAPS)
    check_choice("hvp", hvp, HVPS)
    check_meta_batch(xs, ys, xs if xq is None else xq, ys if yq is None else yq, loss_name=loss_name,
                     dtype=dtype, device=device)
    op_backend = None if backend == "auto" else backend
    if isinstance(fn, nn.Module):
        module = fn
        check_model(module, "this algorithm")
        if task_map == "auto" and hvp == "auto":
            st, _ = mlp_tasks(module, names, loss, xs, ys, op_backend)
            if st is not None:
                return st
        fn = module_fn(module)  # safe to call from the task workers
    elif not callable(fn):
        raise TypeError(f"fn must be an nn.Module or a callable fn(params, x), got {type(fn).__name__}")
    tm = task_map if task_map != "auto" else ("loop" if device.type == "cpu" and xs.dim() >= 5 else "vmap")
    workers = choose_workers("auto", tm, fn, xs, xs if xq is None else xq)  # type: ignore[arg-type]
    return GenericTasks(fn, names, loss_fn, tm, "autograd" if hvp == "auto" else hvp,  # type: ignore[arg-type]
                        fused_bn=device.type == "cpu", workers=workers)

