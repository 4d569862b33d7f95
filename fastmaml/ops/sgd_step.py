"""``sgd_step``: the fused multi-tensor, multi-task inner update θ' = θ − α ⊙ g.

Four faces (STYLE.md): kernels (``csrc/sgd_step_cpu.cpp``, ``csrc/sgd_step_cuda.cu``,
:mod:`fastmaml.triton.sgd_step`) → launchers (:func:`_launch_forward`,
:func:`_launch_backward`) → :class:`_SgdStep` (``torch.autograd.Function``,
setup_context style, with a ``vmap`` rule) → :func:`sgd_step`. The reference twin is
:func:`fastmaml.reference.sgd_step`.

Call path when nothing needs a gradient (the common inner-loop call under
``torch.no_grad`` or on detached tensors): checks, one allocation per output and one
kernel call, no ``autograd.Function``. The sinusoid MLP's six tiny tensors make Python
overhead the dominant cost there (the kernel itself moves ~350 KB in ~5 µs), so a CPU
call with a Python-float lr goes through :func:`_lean_cpu_forward`: the extension reads
every tensor's attributes through the C API and checks them (dtype, device, shape,
contiguity; requires_grad only under grad mode), allocates the outputs with
``torch.empty_like`` and runs the kernel, which also rejects overlapping inputs.
Anything unusual, every bad input included, falls through to the general path, whose
named checks raise.

``out=`` (caller-provided outputs, like torch ops' ``out=``): the update is written into
n given contiguous tensors ``[T, *shape_i]`` instead of new ones, so an inner loop can
reuse its buffers (K steps: ping-pong two buffer sets) and skip the allocation (tiny
sets: ~1 µs per ``empty_like``) and the page faults of fresh memory (large sets). Each
``out[i]`` must be separate memory from every input and every other output (in-place
``out=params`` is refused: a shared θ is read by every task while it is written); the
C++ overlap check (cpu, cuda) and its Python twin (reference, triton) enforce this. Like
torch's ``out=``, it is not differentiable: refused when grad mode is on and any input
(or an ``out`` tensor) requires grad, and inside torch.func transforms. The kernels
write through raw pointers, so the ``out`` tensors' version counters are bumped (as an
in-place torch op would) and autograd still notices a tensor saved for backward being
overwritten.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch._C._functorch import maybe_current_level as _functorch_level

from fastmaml import _checks, _ext, backends
from fastmaml import reference as ref
from fastmaml.reference.sgd_step import LR

# lr kinds (how α was given) and the kernels' lr modes (how it is read; sgd_step.h).
LR_VALUE, LR_SCALAR, LR_PER_TENSOR, LR_PER_ELEMENT = 0, 1, 2, 3
_KERNEL_LR_MODE = (0, 1, 1, 2)
_DTYPE_CODE = {torch.float32: 0, torch.float64: 1}

# Test hook: run the CUDA kernels with 64-bit indexing even for small tensors (the
# path otherwise taken only when some tensor has T·N >= 2^31 elements).
FORCE_INDEX64 = False

_CPU = torch.device("cpu")
_increment_version = torch._C._increment_version  # (tensors): as an in-place op does


class Spec(NamedTuple):
    """Validated structure of one call (no tensors): what the launchers need."""

    n: int  # number of tensors
    tasks: int  # T
    dtype: torch.dtype
    device: torch.device
    shared: tuple[int, ...]  # 1 when params[i] is [*shape_i] (shared by the tasks)
    numel: tuple[int, ...]  # N_i = numel(shape_i)
    lr_kind: int  # LR_VALUE | LR_SCALAR | LR_PER_TENSOR | LR_PER_ELEMENT
    lr_value: float  # the Python float of LR_VALUE (0.0 otherwise)
    requires_grad: bool  # some input requires grad


def _lr_tensors(lr: LR, kind: int) -> list[torch.Tensor]:
    if kind == LR_VALUE:
        return []
    if kind == LR_PER_ELEMENT:
        return list(lr)  # type: ignore[arg-type]
    return [lr]  # type: ignore[list-item]


def _validate(params: object, grads: object, lr: object, strict_layout: bool) -> Spec:
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
    if dtype not in _DTYPE_CODE:
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
        kind = LR_VALUE
        lr_value = float(lr)
    elif isinstance(lr, torch.Tensor):
        _check_lr_tensor("lr", lr, dtype, device, strict_layout)
        if lr.dim() == 0:
            kind = LR_SCALAR
        elif lr.dim() == 1 and lr.shape[0] == n:
            kind = LR_PER_TENSOR
        else:
            raise ValueError(
                f"lr as a tensor must be 0-d (one rate) or of shape ({n},) (one rate per tensor), got "
                f"{tuple(lr.shape)}; per-element rates are a list of tensors shaped like params"
            )
        rg = rg or lr.requires_grad
    elif isinstance(lr, (list, tuple)):
        kind = LR_PER_ELEMENT
        if len(lr) != n:
            raise ValueError(f"lr as a list (per-element rates) must hold {n} tensors like params, got {len(lr)}")
        for i in range(n):
            a = lr[i]
            _checks.tensor(f"lr[{i}]", a)
            _check_lr_tensor(f"lr[{i}]", a, dtype, device, strict_layout)
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


def _check_lr_tensor(name: str, a: torch.Tensor, dtype: torch.dtype, device: torch.device, strict: bool) -> None:
    if not a.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor of dtype {dtype}, got {a.dtype}")
    _checks.float_dtype(name, a, dtype)
    _checks.same_device(name, a, device)
    if strict:
        _checks.contiguous(name, a)


def _check_overlap(
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
    spans = [(*_checks._span(t), name) for name, t in named if t.numel()]
    spans += [(*_checks._span(o), f"out[{i}]") for i, o in enumerate(out) if o.numel()]
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


def _check_out(out: object, spec: Spec, grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
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


# ---- launchers: plain (non-transformed), contiguous tensors only ---------------------


def _lr_ptrs(spec: Spec, lrs: list[torch.Tensor]) -> list[int]:
    if spec.lr_kind == LR_VALUE:
        return []
    if spec.lr_kind == LR_SCALAR:
        return [lrs[0].data_ptr()] * spec.n
    if spec.lr_kind == LR_PER_TENSOR:
        base, es = lrs[0].data_ptr(), lrs[0].element_size()
        return [base + i * es for i in range(spec.n)]
    return [a.data_ptr() for a in lrs]


def _kernel_spec_args(spec: Spec, lrs: list[torch.Tensor]) -> tuple:
    """The launchers' shared arguments, in the bindings' order: sizes, shared flags, T,
    dtype code, lr mode, lr value and lr pointers."""
    return (spec.numel, spec.shared, spec.tasks, _DTYPE_CODE[spec.dtype], _KERNEL_LR_MODE[spec.lr_kind],
            spec.lr_value, _lr_ptrs(spec, lrs))




# Outputs of at least this many bytes in total are carved out of one buffer (see
# _alloc_like_ptrs); smaller ones get one empty_like each.
_ONE_BUFFER_MIN_BYTES = 1 << 20


def _alloc_like(spec: Spec, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """New contiguous tensors shaped like ``like[i]`` ([T, *shape_i])."""
    return _alloc_like_ptrs(spec, like)[0]


def _alloc_like_ptrs(spec: Spec, like: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[int]]:
    """:func:`_alloc_like` and the new tensors' data pointers; ``like`` must be contiguous.

    Small outputs: one ``empty_like`` each (contiguous: ``like``'s preserved layout), the
    cheapest small allocation measured here (~1 µs each; a view of one shared buffer
    costs ~2 µs). Large outputs are views of ONE buffer: glibc hands freed heap memory
    above its trim threshold (twice the largest block it has recently mmapped and freed)
    back to the OS. Measured on the Omniglot set (18 outputs, 14.5 MB, the largest
    4.7 MB), one thread, a loop of calls: separate blocks were fresh memory every call
    (2312 page faults, 7.4-8.2 ms per call), one buffer was reused (0 faults, 1.4-1.5 ms).
    Interleaved with other ops' allocations both mostly reuse memory (one buffer: median
    0, mean 112-366 faults per call; separate: mean 0-18)."""
    T = spec.tasks
    total = T * sum(spec.numel)
    es = 8 if spec.dtype is torch.float64 else 4
    if total * es < _ONE_BUFFER_MIN_BYTES:
        out = [torch.empty_like(x) for x in like]
        return out, [o.data_ptr() for o in out]
    flat = torch.empty(total, dtype=spec.dtype, device=spec.device)
    base = flat.data_ptr()
    out = []
    ptrs = []
    off = 0
    for x, N in zip(like, spec.numel):
        out.append(flat.as_strided(x.shape, _contiguous_strides(x.shape), off))
        ptrs.append(base + off * es)
        off += T * N
    return out, ptrs


def _contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides = []
    acc = 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(strides))


def _launch_forward(
    backend: str,
    spec: Spec,
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    lrs: list[torch.Tensor],
    out: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """out_i = θ_i − α_i ⊙ g_i on the chosen compiled/Triton backend: into new tensors,
    or into ``out`` (already checked by :func:`_check_out`; overlap is checked here)."""
    if out is None:
        outs, out_ptrs = _alloc_like_ptrs(spec, grads)
    else:
        outs, out_ptrs = out, [o.data_ptr() for o in out]
    if backend == "triton":
        from fastmaml.triton import sgd_step as tri

        _check_overlap(params, grads, lrs, out)
        tri.forward(spec, params, grads, lrs, outs)
        return outs
    C = _ext.ext()
    args = (
        [p.data_ptr() for p in params],
        [g.data_ptr() for g in grads],
        out_ptrs,
        *_kernel_spec_args(spec, lrs),
    )
    if backend == "cpu":
        C.sgd_step_fwd_cpu(*args)  # also checks that no two inputs/outputs overlap (ValueError)
    else:
        with _ext.cuda_launch(spec.device) as (index, stream):
            C.sgd_step_fwd_cuda(*args, index, stream, FORCE_INDEX64)
    return outs


def _launch_backward(
    backend: str,
    spec: Spec,
    v: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    lrs: list[torch.Tensor],
    need_theta: Sequence[bool],
    need_grad: Sequence[bool],
    need_lr: bool,
) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None], torch.Tensor | list[torch.Tensor] | None]:
    """The fused backward (see csrc/sgd_step.h): dθ_i (Σ_t v_i for a shared θ_i, v_i
    itself otherwise), dg_i = −α_i ⊙ v_i, dα = −Σ g ⊙ v at α's granularity."""
    n = spec.n
    es = 8 if spec.dtype is torch.float64 else 4
    dtheta: list[torch.Tensor | None] = [None] * n
    dgrad: list[torch.Tensor | None] = list(_alloc_like(spec, v)) if any(need_grad) else [None] * n
    for i in range(n):
        if need_theta[i]:
            dtheta[i] = v[i].new_empty(v[i].shape[1:]) if spec.shared[i] else v[i]
        if not need_grad[i]:
            dgrad[i] = None
    dlr_buffers: list[torch.Tensor] = []
    dlr: torch.Tensor | list[torch.Tensor] | None = None
    if need_lr and spec.lr_kind != LR_VALUE:
        if spec.lr_kind == LR_PER_ELEMENT:
            dlr_buffers = [torch.empty_like(a) for a in lrs]
            dlr = dlr_buffers
        else:  # one value per tensor; a 0-d α sums them afterwards (fixed order)
            per_tensor = torch.empty(n, dtype=spec.dtype, device=spec.device)
            dlr_buffers = [per_tensor]
            dlr = per_tensor if spec.lr_kind == LR_PER_TENSOR else None
    if backend == "triton":
        from fastmaml.triton import sgd_step as tri

        tri.backward(spec, v, grads, lrs, dtheta, dgrad, dlr_buffers)
    else:
        ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
        if dlr_buffers and spec.lr_kind != LR_PER_ELEMENT:
            base = dlr_buffers[0].data_ptr()
            dlr_ptrs = [base + i * es for i in range(n)]
        elif dlr_buffers:
            dlr_ptrs = [b.data_ptr() for b in dlr_buffers]
        else:
            dlr_ptrs = [0] * n
        args = (
            [x.data_ptr() for x in v],
            [g.data_ptr() for g in grads],
            *_kernel_spec_args(spec, lrs),
            [ptr(d) if spec.shared[i] else 0 for i, d in enumerate(dtheta)],
            [ptr(d) for d in dgrad],
            dlr_ptrs,
        )
        if backend == "cpu":
            _ext.ext().sgd_step_bwd_cpu(*args)
        else:
            with _ext.cuda_launch(spec.device) as (index, stream):
                _ext.ext().sgd_step_bwd_cuda(*args, index, stream, FORCE_INDEX64)
    if need_lr and spec.lr_kind == LR_SCALAR:
        dlr = dlr_buffers[0].sum()
    return dtheta, dgrad, dlr


def _backward_torch(
    spec: Spec, v: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], lrs: list[torch.Tensor], need_lr: bool
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor | list[torch.Tensor] | None]:
    """The same backward in differentiable torch ops: used for double backward
    (``create_graph=True``) and inside torch.func transforms, where tensors are wrapped."""
    alphas = _alphas(spec, lrs)
    dtheta = [v[i].sum(0) if spec.shared[i] else v[i] for i in range(spec.n)]
    dgrad = [-(a * vi) for a, vi in zip(alphas, v)]
    dlr: torch.Tensor | list[torch.Tensor] | None = None
    if need_lr and spec.lr_kind != LR_VALUE:
        if spec.lr_kind == LR_PER_ELEMENT:
            dlr = [-(g * vi).sum(0) for g, vi in zip(grads, v)]
        else:
            per_tensor = torch.stack([-(g * vi).sum() for g, vi in zip(grads, v)])
            dlr = per_tensor if spec.lr_kind == LR_PER_TENSOR else per_tensor.sum()
    return dtheta, dgrad, dlr


def _alphas(spec: Spec, lrs: list[torch.Tensor]) -> list[torch.Tensor | float]:
    if spec.lr_kind == LR_VALUE:
        return [spec.lr_value] * spec.n
    if spec.lr_kind == LR_SCALAR:
        return [lrs[0]] * spec.n
    if spec.lr_kind == LR_PER_TENSOR:
        return [lrs[0][i] for i in range(spec.n)]
    return list(lrs)


# ---- autograd ------------------------------------------------------------------------


class _SgdStep(torch.autograd.Function):
    """Inputs: ``(spec, backend, *params, *grads, *lr_tensors)``; outputs the n updated
    tensors. Backward: the fused kernel, or differentiable torch ops when a graph of
    the backward is needed (double backward, torch.func transforms)."""

    @staticmethod
    def forward(spec: Spec, backend: str, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        n = spec.n
        tensors = tuple(t.contiguous() for t in tensors)  # no-op unless a transform passed a strided view
        return tuple(_launch_forward(backend, spec, tensors[:n], tensors[n : 2 * n], list(tensors[2 * n :])))

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        spec, backend = inputs[0], inputs[1]
        n = spec.n
        ctx.spec = spec
        ctx.backend = backend
        # dg needs α and dα needs g; θ is never needed. The T copies of g are kept only
        # when α needs a gradient (in a K-step inner loop they would otherwise hold K
        # gradient-sized buffers alive for nothing).
        ctx.keep_grads = any(ctx.needs_input_grad[2 + 2 * n :])
        kept = inputs[2 + n :] if ctx.keep_grads else inputs[2 + 2 * n :]
        ctx.save_for_backward(*kept)

    @staticmethod
    def backward(ctx, *v: torch.Tensor):  # type: ignore[override]
        spec: Spec = ctx.spec
        n = spec.n
        saved = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:]
        need_theta, need_grad = needs[:n], needs[n : 2 * n]
        need_lr = any(needs[2 * n :])
        if ctx.keep_grads:
            grads, lrs = saved[:n], list(saved[n:])
        else:
            grads, lrs = None, list(saved)
        if torch.is_grad_enabled() or _functorch_level() is not None:
            dtheta, dgrad, dlr = _backward_torch(spec, v, grads, lrs, need_lr)
        else:
            v = tuple(x.contiguous() for x in v)
            # without dα the kernels never read g; v (same shapes) stands in for it
            dtheta, dgrad, dlr = _launch_backward(
                ctx.backend, spec, v, grads if grads is not None else v, lrs, need_theta, need_grad, need_lr
            )
        if spec.lr_kind == LR_VALUE:
            dlr_out: tuple = ()
        elif spec.lr_kind == LR_PER_ELEMENT:
            dlr_out = tuple(dlr) if dlr is not None else (None,) * n
        else:
            dlr_out = (dlr,)
        return (None, None, *dtheta, *dgrad, *dlr_out)

    @staticmethod
    def vmap(info, in_dims, spec: Spec, backend: str, *tensors: torch.Tensor):  # type: ignore[override]
        """Batching rule. When only grads (and params) carry the vmapped dimension B and
        every grad does, the batch folds into the task dimension (T → B·T) and the
        fused kernel runs once; otherwise the update is computed with torch ops."""
        n = spec.n
        dims = in_dims[2:]
        B = info.batch_size
        params, grads, lrs = list(tensors[:n]), list(tensors[n : 2 * n]), list(tensors[2 * n :])
        pd, gd, ld = dims[:n], dims[n : 2 * n], dims[2 * n :]
        T = spec.tasks
        if all(d is None for d in ld) and all(d is not None for d in gd):
            fparams, fgrads = [], []
            for i in range(n):
                g = grads[i].movedim(gd[i], 0)  # [B, T, *s]
                shape = g.shape[2:]
                fgrads.append(g.reshape(B * T, *shape))
                p = params[i] if pd[i] is None else params[i].movedim(pd[i], 0)
                if pd[i] is None and spec.shared[i]:
                    fparams.append(p)  # still shared by all B·T tasks
                else:
                    if pd[i] is None:  # per-task [T, *s], the same for every batch entry
                        p = p.unsqueeze(0)
                    elif spec.shared[i]:  # [B, *s]: one θ per batch entry
                        p = p.unsqueeze(1)
                    fparams.append(p.expand(B, T, *shape).reshape(B * T, *shape))
            lr = _lr_arg(spec, lrs)
            outs = sgd_step(fparams, fgrads, lr, backend=backend)
            return tuple(o.reshape(B, T, *o.shape[1:]) for o in outs), (0,) * n
        # General rule: bring every batched tensor's batch dim to the front, give the
        # unbatched ones a size-1 front dim, and broadcast.
        def front(x: torch.Tensor, d: int | None) -> torch.Tensor:
            return x.unsqueeze(0) if d is None else x.movedim(d, 0)

        outs = []
        for i in range(n):
            g = front(grads[i], gd[i])  # [B|1, T, *s]
            p = front(params[i], pd[i])
            if spec.shared[i]:
                p = p.unsqueeze(1)
            extra = g.dim() - 2  # number of element dims
            if spec.lr_kind == LR_VALUE:
                a = spec.lr_value
            elif spec.lr_kind == LR_SCALAR:
                a = front(lrs[0], ld[0]).reshape(-1, *([1] * (extra + 1)))
            elif spec.lr_kind == LR_PER_TENSOR:
                a = front(lrs[0], ld[0])[:, i].reshape(-1, *([1] * (extra + 1)))
            else:
                a = front(lrs[i], ld[i]).unsqueeze(1)
            o = p - a * g
            outs.append(o.expand(B, *o.shape[1:]) if o.shape[0] != B else o)
        return tuple(outs), (0,) * n


def _lr_arg(spec: Spec, lrs: list[torch.Tensor]) -> LR:
    if spec.lr_kind == LR_VALUE:
        return spec.lr_value
    if spec.lr_kind == LR_PER_ELEMENT:
        return lrs
    return lrs[0]


# ---- public function -----------------------------------------------------------------


def sgd_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    lr: LR,
    *,
    backend: str | None = None,
    out: Sequence[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """The inner SGD update of every parameter tensor for T tasks: θ'_i = θ_i − α_i ⊙ g_i.

    Args:
        params: n tensors; ``params[i]`` is ``[*shape_i]`` (shared by the T tasks, e.g.
            the meta-parameters at step 0) or ``[T, *shape_i]`` (per task).
        grads: n tensors ``[T, *shape_i]``; T >= 1, the same for every tensor.
        lr: the inner learning rate α, one of
            - a Python float: one fixed rate (not differentiable);
            - a 0-d tensor: one rate, learnable;
            - a 1-d tensor ``[n]``: one rate per parameter tensor (a row of MAML++'s
              per-step, per-layer ``[K, n]`` table);
            - a list of n tensors, ``lr[i]`` shaped ``[*shape_i]``: per element (Meta-SGD).
        backend: ``"reference" | "cpu" | "cuda" | "triton" | "auto"``; default: the
            ``FASTMAML_BACKEND`` environment variable, else auto (see
            :mod:`fastmaml.backends`).
        out: optional n tensors to write the update into (like torch ops' ``out=``):
            ``out[i]`` contiguous, shaped ``[T, *shape_i]`` like ``grads[i]``, of the
            same dtype and device, sharing no memory with any input or other output
            (so not ``params`` itself: no in-place update). Every element is
            overwritten. Lets an inner loop reuse its buffers instead of allocating
            new outputs each call (K steps: alternate two buffer sets). Not
            differentiable: with grad mode on, no input (nor ``out``) may require
            grad, and it is refused inside torch.func transforms. The ``out``
            tensors' version counters are bumped, as by an in-place torch op.

    Returns:
        n new tensors ``[T, *shape_i]``, or with ``out`` a list of the ``out`` tensors
        themselves (other inputs are never modified).

    All tensors must be contiguous, on one device, and share one dtype, float32 or
    float64 (a tensor lr included: mixed dtypes are an error, not promoted). No two
    input tensors may share memory (nor an ``out`` tensor with any other). Differentiable with respect to params, grads and
    a tensor lr (dθ = v summed over tasks for a shared θ, dg = −α ⊙ v, dα = −Σ g ⊙ v
    reduced to α's granularity), by a fused backward kernel; works under
    ``torch.func.grad``/``vjp``/``vmap`` (there the backward is computed with torch ops).
    """
    level = _functorch_level()
    if level is None and type(lr) is float:
        res = _lean_cpu_forward(params, grads, lr, backend, out)
        if res is not None:
            return res
    if out is not None and level is not None:
        raise RuntimeError(
            "sgd_step: out= is not supported inside torch.func transforms (grad/vjp/vmap); call sgd_step "
            "without out="
        )
    spec = _validate(params, grads, lr, strict_layout=level is None)
    name = backends.resolve(backend, spec.device, "sgd_step")
    if out is not None:
        outs = _check_out(out, spec, grads)
        if torch.is_grad_enabled() and (spec.requires_grad or any(o.requires_grad for o in outs)):
            raise RuntimeError(
                "sgd_step: out= does not support automatic differentiation, but an input (params, grads, "
                "lr) or an out tensor requires grad; call sgd_step without out= (or under torch.no_grad() "
                "if no gradient is wanted)"
            )
        lrs = _lr_tensors(lr, spec.lr_kind)
        if name == "reference":
            _check_overlap(params, grads, lrs, outs)
            with torch.no_grad():
                for o, r in zip(outs, ref.sgd_step(params, grads, lr)):
                    o.copy_(r)  # bumps o's version counter itself
            return outs
        _launch_forward(name, spec, params, grads, lrs, outs)
        _increment_version(outs)
        return outs
    if name == "reference":
        if level is None:
            _check_overlap(params, grads, _lr_tensors(lr, spec.lr_kind))
        return ref.sgd_step(params, grads, lr)
    lrs = _lr_tensors(lr, spec.lr_kind)
    if level is None and not (spec.requires_grad and torch.is_grad_enabled()):
        return _launch_forward(name, spec, params, grads, lrs)  # lean path: nothing to differentiate
    return list(_SgdStep.apply(spec, name, *params, *grads, *lrs))


def _lean_cpu_forward(
    params: object, grads: object, lr: float, backend: str | None, out: object = None
) -> list[torch.Tensor] | None:
    """The whole call for the commonest case, CPU tensors and a Python-float lr with
    nothing to differentiate; None when that is not the case or when any check fails
    (then :func:`sgd_step`'s general path runs, and its named checks raise).

    The per-tensor work runs in the extension (``sgd_step_fwd_cpu_lean``), which reads
    each tensor's attributes through the C API and checks the same facts as
    :func:`_validate`: one dtype, float32 or float64; all on the CPU; contiguity;
    requires_grad (only under grad mode: without it nothing is recorded); the shapes
    (T = grads[0].shape[0] >= 1, g_i [T, *shape_i], θ_i [*shape_i] or [T, *shape_i]).
    Then one ``empty_like`` per output and the kernel, which also rejects overlapping
    inputs (ValueError naming the pair). Outputs of ``_ONE_BUFFER_MIN_BYTES`` or more
    are declined too: the general path carves them out of one buffer (see
    :func:`_alloc_like_ptrs`; its Python checks cost microseconds against milliseconds).

    With ``out`` (a list or tuple), each ``out[i]`` is checked there as well (dtype,
    CPU, contiguous, shape == grads[i].shape, requires_grad under grad mode) and written
    instead of a new tensor, at any size; the kernel rejects any output overlapping an
    input or another output. Then the out tensors' version counters are bumped."""
    if type(params) not in (list, tuple) or type(grads) not in (list, tuple) or not grads:
        return None
    g0 = grads[0]
    if not isinstance(g0, torch.Tensor) or not g0.is_cpu:
        return None
    C = _ext._C
    if C is None or (backend != "cpu" and backends.resolve(backend, _CPU, "sgd_step") != "cpu"):
        return None
    dtype = g0.dtype
    if dtype is torch.float32:
        code = 0
    elif dtype is torch.float64:
        code = 1
    else:
        return None
    if out is None:
        return C.sgd_step_fwd_cpu_lean(
            params, grads, dtype, code, torch.is_grad_enabled(), lr, torch.empty_like, _ONE_BUFFER_MIN_BYTES
        )
    res = C.sgd_step_fwd_cpu_lean(
        params, grads, dtype, code, torch.is_grad_enabled(), lr, torch.empty_like, _ONE_BUFFER_MIN_BYTES, out
    )
    if res is not None:
        _increment_version(res)
    return res
