"""``sgd_step``'s argument checks: every argument validated (``TypeError`` /
``ValueError`` naming it, the expected and the actual value) before any pointer
reaches a kernel, and the call's structure returned as a :class:`Spec`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from fastmaml import _checks, codes
from fastmaml.reference.sgd_step import LR

class Spec(NamedTuple):
    """Validated structure of one call (no tensors): what the launchers need."""

    n: int  # number of tensors
    tasks: int  # T
    dtype: torch.dtype
    device: torch.device
    shared: tuple[int, ...]  # 1 when params[i] is [*shape_i] (shared by the tasks)
    numel: tuple[int, ...]  # N_i = numel(shape_i)
    lr_kind: int  # codes.SGD_LR_FLOAT | codes.SGD_LR_SCALAR | codes.SGD_LR_PER_TENSOR | codes.SGD_LR_PER_ELEMENT
    lr_value: float  # the Python float of codes.SGD_LR_FLOAT (0.0 otherwise)
    requires_grad: bool  # some input requires grad


def lr_tensors(lr: LR, kind: int) -> list[torch.Tensor]:
    if kind == codes.SGD_LR_FLOAT:
        return []
    if kind == codes.SGD_LR_PER_ELEMENT:
        return list(lr)  # type: ignore[arg-type]
    return [lr]  # type: ignore[list-item]


def validate(params: object, grads: object, lr: object, strict_layout: bool) -> Spec:
    """Check every argument (raising ``TypeError``/``ValueError`` naming it) and return
    the call's :class:`Spec`. ``strict_layout=False`` (inside torch.func transforms,
    where the logical tensors hide their storage) skips contiguity; the launch path
    then makes the physical tensors contiguous itself."""
    if isinstance(params, torch.Tensor) or not isinstance(params, (list, tuple)):
        _checks.tensor_list("params", params)
    if isinstance(grads, torch.Tensor) or not isinstance(grads, (list, tuple)):
        _checks.tensor_list("grads", grads)
    n = len(params)
    if n == 0:
        raise ValueError("params must hold at least 1 tensor, got 0")
    if len(grads) != n:
        raise ValueError(f"grads must hold one tensor per params entry: expected {n}, got {len(grads)}")
    g0 = grads[0]
    if not isinstance(g0, torch.Tensor):
        _checks.tensor("grads[0]", g0)
    dtype = g0.dtype
    device = g0.device
    if dtype not in codes.DTYPE:
        _checks.float_dtype("grads[0]", g0)
    if g0.dim() == 0:
        raise ValueError("grads[0] must have a leading task dimension [T, *shape], got a 0-d tensor")
    tasks = g0.shape[0]
    if tasks == 0:
        raise ValueError("grads[0] has T = 0 tasks (shape (0, ...)); T must be >= 1")
    fast = _scan_fast(params, grads, dtype, device, tasks, strict_layout)
    if fast is not None:
        shared, numel, rg = fast
    else:  # something is off: the named, one-check-at-a-time loop raises the error
        shared, numel, rg = _scan_named(params, grads, n, dtype, device, tasks, strict_layout)

    lr_value = 0.0
    if isinstance(lr, float) or (isinstance(lr, int) and not isinstance(lr, bool)):
        kind = codes.SGD_LR_FLOAT
        lr_value = float(lr)
    elif isinstance(lr, torch.Tensor):
        _checks.lr_tensor("lr", lr, dtype, device, strict_layout)
        if lr.dim() == 0:
            kind = codes.SGD_LR_SCALAR
        elif lr.dim() == 1 and lr.shape[0] == n:
            kind = codes.SGD_LR_PER_TENSOR
        else:
            raise ValueError(
                f"lr as a tensor must be 0-d (one rate) or of shape ({n},) (one rate per tensor), got "
                f"{tuple(lr.shape)}; per-element rates are a list of tensors shaped like params"
            )
        rg = rg or lr.requires_grad
    elif isinstance(lr, (list, tuple)):
        kind = codes.SGD_LR_PER_ELEMENT
        if len(lr) != n:
            raise ValueError(f"lr as a list (per-element rates) must hold {n} tensors like params, got {len(lr)}")
        for i in range(n):
            a = lr[i]
            _checks.tensor(f"lr[{i}]", a)
            _checks.lr_tensor(f"lr[{i}]", a, dtype, device, strict_layout)
            if a.shape != grads[i].shape[1:]:
                raise ValueError(f"lr[{i}] must have shape {tuple(grads[i].shape[1:])} like params[{i}], got {tuple(a.shape)}")
            rg = rg or a.requires_grad
    else:
        raise TypeError(
            "lr must be a float, a 0-d tensor, a 1-d tensor [len(params)] or a list of per-element tensors, got "
            f"{type(lr).__name__}"
        )
    return Spec(n, tasks, dtype, device, tuple(shared), tuple(numel), kind, lr_value, rg)


def _scan_fast(params, grads, dtype: torch.dtype, device: torch.device, tasks: int, strict: bool):
    """The per-tensor checks without naming anything: ``(shared, numel, requires_grad)``
    when every pair (params[i], grads[i]) is valid, else None (then
    :func:`_scan_named` finds and reports the problem). This is most of the cost of a
    small call (the sinusoid MLP), so it avoids isinstance checks (a non-tensor fails
    an attribute lookup) and device objects (``is_cpu`` on CPU)."""
    shared = []
    numel = []
    rg = False
    on_cpu = device.type == "cpu"
    try:
        for p, g in zip(params, grads):
            if p.dtype is not dtype or g.dtype is not dtype:
                return None
            if on_cpu:
                if not (p.is_cpu and g.is_cpu):
                    return None
            elif p.device != device or g.device != device:
                return None
            gs = g.shape
            ps = p.shape
            if gs[0] != tasks:
                return None
            k = len(gs) - len(ps)
            if k == 1 and gs == (tasks, *ps):  # cheaper than slicing a torch.Size
                shared.append(1)
                numel.append(p.numel())
            elif k == 0 and ps == gs:
                shared.append(0)
                numel.append(p.numel() // tasks)
            else:
                return None
            if strict and not (p.is_contiguous() and g.is_contiguous()):
                return None
            rg = rg or p.requires_grad or g.requires_grad
    except (AttributeError, TypeError, IndexError):
        return None
    return shared, numel, rg


def _scan_named(params, grads, n: int, dtype: torch.dtype, device: torch.device, tasks: int, strict_layout: bool):
    """The same checks one at a time, raising ``TypeError``/``ValueError`` that names
    the offending argument."""
    shared = []
    numel = []
    rg = False
    for i in range(n):
        p = params[i]
        g = grads[i]
        if not isinstance(p, torch.Tensor):
            _checks.tensor(f"params[{i}]", p)
        if not isinstance(g, torch.Tensor):
            _checks.tensor(f"grads[{i}]", g)
        if p.dtype is not dtype:
            _checks.float_dtype(f"params[{i}]", p, dtype)
        if g.dtype is not dtype:
            _checks.float_dtype(f"grads[{i}]", g, dtype)
        if p.device != device:
            _checks.same_device(f"params[{i}]", p, device)
        if g.device != device:
            _checks.same_device(f"grads[{i}]", g, device)
        gs = g.shape
        if len(gs) == 0 or gs[0] != tasks:
            raise ValueError(
                f"grads[{i}] must have shape [T, *shape] with T = {tasks} (from grads[0]), got {tuple(gs)}"
            )
        ps = p.shape
        if len(ps) == len(gs) and ps == gs:
            shared.append(0)
        elif len(ps) + 1 == len(gs) and ps == gs[1:]:
            shared.append(1)
        else:
            raise ValueError(
                f"params[{i}] must have shape {tuple(gs[1:])} (shared by the tasks) or {tuple(gs)} (per task) "
                f"to match grads[{i}], got {tuple(ps)}"
            )
        if strict_layout:
            if not p.is_contiguous():
                _checks.contiguous(f"params[{i}]", p)
            if not g.is_contiguous():
                _checks.contiguous(f"grads[{i}]", g)
        numel.append(p.numel() if shared[-1] else p.numel() // tasks)
        rg = rg or p.requires_grad or g.requires_grad

    return shared, numel, rg


def check_overlap(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    lrs: list[torch.Tensor],
    out: Sequence[torch.Tensor] | None = None,
) -> None:
    """Python twin of the C++ overlap check (reference and triton backends): no two
    inputs, and no output and any other tensor, may share memory."""
    named = [(f"params[{i}]", p) for i, p in enumerate(params)]
    named += [(f"grads[{i}]", g) for i, g in enumerate(grads)]
    named += [(f"lr[{i}]" if len(lrs) > 1 else "lr", a) for i, a in enumerate(lrs)]
    if out is None:
        _checks.no_overlap_among(named)
        return
    _checks.no_overlap_among(named)  # the inputs among themselves
    # then every output against everything: the same sort-and-sweep, naming the output
    spans = [(*_checks.span(t), name) for name, t in named if t.numel()]
    spans += [(*_checks.span(o), f"out[{i}]") for i, o in enumerate(out) if o.numel()]
    spans.sort(key=lambda s: s[0])
    far = spans[0] if spans else None
    for span in spans[1:]:
        if span[0] < far[1]:
            o, other = (far[2], span[2]) if far[2].startswith("out[") else (span[2], far[2])
            raise ValueError(f"sgd_step: {o} overlaps {other} in memory; {_OUT_SEPARATE}")
        if span[1] > far[1]:
            far = span


_OUT_SEPARATE = (
    "every out tensor must be separate memory from the inputs and from the other outputs "
    "(in-place out=params is not supported: a shared θ is read by every task while it is written); "
    "use a second set of buffers"
)


def check_out(out: object, spec: Spec, grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Validate ``out=`` against the call's :class:`Spec` (raising ``TypeError``/
    ``ValueError`` that names ``out[i]``, expected and actual); returns it as a list."""
    if isinstance(out, torch.Tensor) or not isinstance(out, (list, tuple)):
        raise TypeError(
            f"out must be a list or tuple of {spec.n} tensors shaped like grads, got {type(out).__name__}"
        )
    if len(out) != spec.n:
        raise ValueError(f"out must hold one tensor per params entry: expected {spec.n}, got {len(out)}")
    for i, o in enumerate(out):
        name = f"out[{i}]"
        if not isinstance(o, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(o).__name__}")
        if o.dtype is not spec.dtype:
            raise TypeError(f"{name} must have dtype {spec.dtype} like grads, got {o.dtype}")
        if o.device != spec.device:
            raise ValueError(f"{name} must be on {spec.device} like grads, got {o.device}")
        want = grads[i].shape
        if o.shape != want:
            raise ValueError(f"{name} must have shape {tuple(want)} like grads[{i}] ([T, *shape]), got {tuple(o.shape)}")
        if not o.is_contiguous():
            raise ValueError(f"{name} must be contiguous, got strides {tuple(o.stride())} (e.g. allocate it with torch.empty_like(grads[{i}]))")
    return list(out)
