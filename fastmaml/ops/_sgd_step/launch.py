"""``sgd_step``'s launchers: plain (non-transformed), contiguous tensors, checked
arguments. :func:`launch_forward` / :func:`launch_backward` call the C++ (cpu, cuda)
or Triton kernels; :func:`backward_torch` is the same backward in differentiable torch
ops; :func:`lean_cpu_forward` is the whole call for the commonest case (see
:mod:`fastmaml.ops._sgd_step.function`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastmaml import _ext, backends, codes
from fastmaml.ops._sgd_step.checks import Spec, check_overlap

# Test hook: run the CUDA kernels with 64-bit indexing even for small tensors (the
# path otherwise taken only when some tensor has T·N >= 2^31 elements).
FORCE_INDEX64 = False

_CPU = torch.device("cpu")
increment_version = torch._C._increment_version  # (tensors): as an in-place op does


def _kernel_spec_args(spec: Spec, lrs: list[torch.Tensor]) -> tuple:
    """The launchers' shared arguments, in the bindings' order: sizes, shared flags, T,
    dtype code, lr mode, lr value and lr pointers."""
    return (spec.numel, spec.shared, spec.tasks, codes.DTYPE[spec.dtype], codes.SGD_KERNEL_LR_MODE[spec.lr_kind],
            spec.lr_value, codes.sgd_lr_pointers(spec.lr_kind, spec.n, lrs))


def _cuda_stream(device: torch.device) -> tuple[int, int]:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return index, torch.cuda.current_stream(index).cuda_stream


# Outputs of at least this many bytes in total are carved out of one buffer (see
# _alloc_like_ptrs); smaller ones get one empty_like each.
ONE_BUFFER_MIN_BYTES = 1 << 20


def _alloc_like(spec: Spec, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """New contiguous tensors shaped like ``like[i]`` ([T, *shape_i])."""
    return _alloc_like_ptrs(spec, like)[0]


def _alloc_like_ptrs(spec: Spec, like: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[int]]:
    """:func:`_alloc_like` and the new tensors' data pointers; ``like`` must be contiguous.

    Small outputs: one ``empty_like`` each (contiguous: ``like``'s preserved layout), the
    cheapest small allocation (a view of one shared buffer costs about twice as much).
    Large outputs are views of ONE buffer: glibc hands freed heap memory above its trim
    threshold (twice the largest block it has recently mmapped and freed) back to the OS,
    so separate large blocks are fresh memory, with its page faults, on every call, while
    one buffer is reused (the measurements: benchmarks/RESULTS.md, section
    "fastmaml/ops/_sgd_step/launch.py")."""
    T = spec.tasks
    total = T * sum(spec.numel)
    es = 8 if spec.dtype is torch.float64 else 4
    if total * es < ONE_BUFFER_MIN_BYTES:
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


def launch_forward(
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

        check_overlap(params, grads, lrs, out)
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
        C.sgd_step_fwd_cuda(*args, *_cuda_stream(spec.device), FORCE_INDEX64)
    return outs


def launch_backward(
    backend: str,
    spec: Spec,
    v: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    lrs: list[torch.Tensor],
    need_theta: Sequence[bool],
    need_grad: Sequence[bool],
    need_lr: bool,
) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None], torch.Tensor | list[torch.Tensor] | None]:
    """The fused backward (see csrc/sgd_step/sgd_step.h): dθ_i (Σ_t v_i for a shared θ_i, v_i
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
    if need_lr and spec.lr_kind != codes.SGD_LR_FLOAT:
        if spec.lr_kind == codes.SGD_LR_PER_ELEMENT:
            dlr_buffers = [torch.empty_like(a) for a in lrs]
            dlr = dlr_buffers
        else:  # one value per tensor; a 0-d α sums them afterwards (fixed order)
            per_tensor = torch.empty(n, dtype=spec.dtype, device=spec.device)
            dlr_buffers = [per_tensor]
            dlr = per_tensor if spec.lr_kind == codes.SGD_LR_PER_TENSOR else None
    if backend == "triton":
        from fastmaml.triton import sgd_step as tri

        tri.backward(spec, v, grads, lrs, dtheta, dgrad, dlr_buffers)
    else:
        ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
        if dlr_buffers and spec.lr_kind != codes.SGD_LR_PER_ELEMENT:
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
            _ext.ext().sgd_step_bwd_cuda(*args, *_cuda_stream(spec.device), FORCE_INDEX64)
    if need_lr and spec.lr_kind == codes.SGD_LR_SCALAR:
        dlr = dlr_buffers[0].sum()
    return dtheta, dgrad, dlr


def backward_torch(
    spec: Spec, v: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], lrs: list[torch.Tensor], need_lr: bool
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor | list[torch.Tensor] | None]:
    """The same backward in differentiable torch ops: used for double backward
    (``create_graph=True``) and inside torch.func transforms, where tensors are wrapped."""
    alphas = _alphas(spec, lrs)
    dtheta = [v[i].sum(0) if spec.shared[i] else v[i] for i in range(spec.n)]
    dgrad = [-(a * vi) for a, vi in zip(alphas, v)]
    dlr: torch.Tensor | list[torch.Tensor] | None = None
    if need_lr and spec.lr_kind != codes.SGD_LR_FLOAT:
        if spec.lr_kind == codes.SGD_LR_PER_ELEMENT:
            dlr = [-(g * vi).sum(0) for g, vi in zip(grads, v)]
        else:
            per_tensor = torch.stack([-(g * vi).sum() for g, vi in zip(grads, v)])
            dlr = per_tensor if spec.lr_kind == codes.SGD_LR_PER_TENSOR else per_tensor.sum()
    return dtheta, dgrad, dlr


def _alphas(spec: Spec, lrs: list[torch.Tensor]) -> list[torch.Tensor | float]:
    if spec.lr_kind == codes.SGD_LR_FLOAT:
        return [spec.lr_value] * spec.n
    if spec.lr_kind == codes.SGD_LR_SCALAR:
        return [lrs[0]] * spec.n
    if spec.lr_kind == codes.SGD_LR_PER_TENSOR:
        return [lrs[0][i] for i in range(spec.n)]
    return list(lrs)


def lean_cpu_forward(
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
    inputs (ValueError naming the pair). Outputs of ``ONE_BUFFER_MIN_BYTES`` or more
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
            params, grads, dtype, code, torch.is_grad_enabled(), lr, torch.empty_like, ONE_BUFFER_MIN_BYTES
        )
    res = C.sgd_step_fwd_cpu_lean(
        params, grads, dtype, code, torch.is_grad_enabled(), lr, torch.empty_like, ONE_BUFFER_MIN_BYTES, out
    )
    if res is not None:
        increment_version(res)
    return res
