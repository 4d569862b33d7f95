"""Triton kernels of ``sgd_step`` (θ' = θ − α ⊙ g and its backward); see
:func:`fastmaml.ops.sgd_step` for the op and ``csrc/sgd_step/sgd_step.h`` for the math.

ONE launch covers all tensors of the call (forward: one launch; backward: one launch,
plus one small deterministic reduction launch when α is one value per tensor or a 0-d
tensor). Each launch reads two int64 tables, built per call on the host and copied to
the device once:

- the tensor table ``[n, 6]``: θ address, g (or v) address, output address, α address,
  N (elements per task) and θ's row stride (0 for a shared θ, N for a per-task θ);
- the block table ``[n_blocks, 3]``: tensor index, column chunk, row chunk.

Program ``pid`` handles BLOCK columns of one tensor; the forward takes ROWS tasks per
program, the backward all T (its per-column sums over tasks stay in one program, so
they are deterministic). Addresses are loaded as int64 and cast to pointers
(``.to(tl.pointer_type(...))``), all offsets are int64, plain pointer arithmetic with
masks (no block pointers), power-of-two ``tl.arange``, no autotuning: it runs on a GPU
with Triton 3.x and on CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from fastmaml import codes

BLOCK = 256  # columns per program
ROWS = 16  # tasks per program (forward)
BLOCK_REDUCE = 256

# the kernels' lr modes (fastmaml.codes), as compile-time constants of the kernels
_LR_BROADCAST = tl.constexpr(codes.SGD_KERNEL_LR_BROADCAST)
_LR_ELEMENT = tl.constexpr(codes.SGD_KERNEL_LR_ELEMENT)

_TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64}


@triton.jit
def _sgd_step_fwd_kernel(
    tensor_table,  # int64 [n, 6]: θ, g, out, α addresses, N, θ row stride
    block_table,  # int64 [n_blocks, 3]: tensor, column chunk, row chunk
    T,
    LR_MODE: tl.constexpr,  # 1 one value at α, 2 per element
    DT: tl.constexpr,
    BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    i = tl.load(block_table + pid * 3)
    col = tl.load(block_table + pid * 3 + 1)
    row = tl.load(block_table + pid * 3 + 2)
    theta = tl.load(tensor_table + i * 6).to(tl.pointer_type(DT))
    g = tl.load(tensor_table + i * 6 + 1).to(tl.pointer_type(DT))
    out = tl.load(tensor_table + i * 6 + 2).to(tl.pointer_type(DT))
    N = tl.load(tensor_table + i * 6 + 4)
    theta_row = tl.load(tensor_table + i * 6 + 5)
    j = col * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = j < N
    if LR_MODE == _LR_BROADCAST:
        alpha = tl.load(tl.load(tensor_table + i * 6 + 3).to(tl.pointer_type(DT)))
    else:
        alpha = tl.load(tl.load(tensor_table + i * 6 + 3).to(tl.pointer_type(DT)) + j, mask=mask, other=0.0)
    t0 = row * ROWS
    t1 = tl.minimum(t0 + ROWS, T)
    for t in range(t0, t1):
        th = tl.load(theta + t * theta_row + j, mask=mask, other=0.0)
        gt = tl.load(g + t * N + j, mask=mask, other=0.0)
        tl.store(out + t * N + j, th - alpha * gt, mask=mask)  # θ' = θ − α·g


@triton.jit
def _sgd_step_bwd_kernel(
    tensor_table,  # int64 [n, 6]: dθ (0 = skip), v, dg (0 = skip), α, N, dα (0 = skip)
    grad_table,  # int64 [n]: g addresses
    block_table,  # int64 [n_blocks, 3]
    partials,  # [n_blocks] Σ g·v of each program (LR_MODE 1)
    T,
    LR_MODE: tl.constexpr,
    DT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    i = tl.load(block_table + pid * 3)
    col = tl.load(block_table + pid * 3 + 1)
    dtheta_addr = tl.load(tensor_table + i * 6)
    v = tl.load(tensor_table + i * 6 + 1).to(tl.pointer_type(DT))
    dg_addr = tl.load(tensor_table + i * 6 + 2)
    N = tl.load(tensor_table + i * 6 + 4)
    dlr_addr = tl.load(tensor_table + i * 6 + 5)
    g = tl.load(grad_table + i).to(tl.pointer_type(DT))
    j = col * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = j < N
    if LR_MODE == _LR_BROADCAST:
        alpha = tl.load(tl.load(tensor_table + i * 6 + 3).to(tl.pointer_type(DT)))
    else:
        alpha = tl.load(tl.load(tensor_table + i * 6 + 3).to(tl.pointer_type(DT)) + j, mask=mask, other=0.0)
    sum_v = tl.zeros([BLOCK], dtype=DT)
    sum_gv = tl.zeros([BLOCK], dtype=DT)
    for t in range(0, T):
        vt = tl.load(v + t * N + j, mask=mask, other=0.0)
        gt = tl.load(g + t * N + j, mask=mask, other=0.0)
        if dg_addr != 0:
            tl.store(dg_addr.to(tl.pointer_type(DT)) + t * N + j, -alpha * vt, mask=mask)  # dg = −α·v
        sum_v += vt  # dθ = Σ_t v (shared θ)
        sum_gv += gt * vt  # dα = −Σ_t g·v
    if dtheta_addr != 0:
        tl.store(dtheta_addr.to(tl.pointer_type(DT)) + j, sum_v, mask=mask)
    if LR_MODE == _LR_ELEMENT:
        if dlr_addr != 0:
            tl.store(dlr_addr.to(tl.pointer_type(DT)) + j, -sum_gv, mask=mask)
    if LR_MODE == _LR_BROADCAST:
        tl.store(partials + pid, tl.sum(sum_gv, axis=0))


@triton.jit
def _sum_partials_kernel(partials, segments, out, BLOCK: tl.constexpr):
    """out[i] = −Σ partials[first_i : first_i + count_i], in a fixed order."""
    i = tl.program_id(0).to(tl.int64)
    first = tl.load(segments + i * 2)
    count = tl.load(segments + i * 2 + 1)
    acc = tl.zeros([BLOCK], dtype=out.dtype.element_ty)
    for k0 in range(0, count, BLOCK):
        k = k0 + tl.arange(0, BLOCK).to(tl.int64)
        acc += tl.load(partials + first + k, mask=k < count, other=0.0)
    tl.store(out + i, -tl.sum(acc, axis=0))


def _block_table(numel: Sequence[int], row_chunks: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Block table ``[n_blocks, 3]`` (tensor, column chunk, row chunk), blocks of one
    tensor contiguous, and per tensor (first block, block count) ``[n, 2]``."""
    col_chunks = torch.tensor([(N + BLOCK - 1) // BLOCK for N in numel], dtype=torch.int64)
    counts = col_chunks * row_chunks
    first = torch.cumsum(counts, 0) - counts
    tensor = torch.repeat_interleave(torch.arange(len(numel), dtype=torch.int64), counts)
    local = torch.arange(int(counts.sum()), dtype=torch.int64) - first[tensor]
    cc = col_chunks[tensor]
    table = torch.stack([tensor, local % cc, local // cc], dim=1)
    return table.to(device), torch.stack([first, counts], dim=1).to(device)


def _lr_addrs(spec, lrs: Sequence[torch.Tensor]) -> tuple[list[int], int, list[torch.Tensor]]:
    """α addresses per tensor and the kernel's LR_MODE (1 one value, 2 per element).

    A Python-float α goes through a 1-element tensor of the call's dtype (mode 1):
    Triton passes Python floats as float32 scalars, which would round a float64 α."""
    if spec.lr_kind == codes.SGD_LR_FLOAT:
        keep = [torch.full((1,), spec.lr_value, dtype=spec.dtype, device=spec.device)]
        return [keep[0].data_ptr()] * spec.n, codes.SGD_KERNEL_LR_BROADCAST, keep
    return codes.sgd_lr_pointers(spec.lr_kind, spec.n, list(lrs)), codes.SGD_KERNEL_LR_MODE[spec.lr_kind], []


def forward(spec, params, grads, lrs, outs) -> None:
    """outs[i] = params[i] − α_i ⊙ grads[i] (one launch)."""
    T = spec.tasks
    la, mode, _keep = _lr_addrs(spec, lrs)
    rows = [
        [p.data_ptr(), g.data_ptr(), o.data_ptr(), la[i], spec.numel[i], 0 if spec.shared[i] else spec.numel[i]]
        for i, (p, g, o) in enumerate(zip(params, grads, outs))
    ]
    tensor_table = torch.tensor(rows, dtype=torch.int64).to(spec.device)
    blocks, _ = _block_table(spec.numel, (T + ROWS - 1) // ROWS, spec.device)
    if blocks.shape[0] == 0:
        return
    _sgd_step_fwd_kernel[(blocks.shape[0],)](
        tensor_table, blocks, T,
        LR_MODE=mode, DT=_TL_DTYPE[spec.dtype], BLOCK=BLOCK, ROWS=ROWS,
    )


def backward(spec, v, grads, lrs, dtheta, dgrad, dlr_buffers) -> None:
    """Fills dtheta[i] (shared θ_i; None = skip), dgrad[i] (None = skip) and the dα
    buffers: per element (one per tensor) or one ``[n]`` tensor of per-tensor values."""
    la, mode, _keep = _lr_addrs(spec, lrs)
    dlr_addr = [b.data_ptr() for b in dlr_buffers] if mode == codes.SGD_KERNEL_LR_ELEMENT and dlr_buffers else [0] * spec.n
    rows = [
        [
            dtheta[i].data_ptr() if (dtheta[i] is not None and spec.shared[i]) else 0,
            v[i].data_ptr(),
            dgrad[i].data_ptr() if dgrad[i] is not None else 0,
            la[i],
            spec.numel[i],
            dlr_addr[i],
        ]
        for i in range(spec.n)
    ]
    tensor_table = torch.tensor(rows, dtype=torch.int64).to(spec.device)
    grad_table = torch.tensor([g.data_ptr() for g in grads], dtype=torch.int64).to(spec.device)
    blocks, segments = _block_table(spec.numel, 1, spec.device)
    n_blocks = blocks.shape[0]
    partials = torch.zeros(max(n_blocks, 1), dtype=spec.dtype, device=spec.device)
    if n_blocks:
        _sgd_step_bwd_kernel[(n_blocks,)](
            tensor_table, grad_table, blocks, partials, spec.tasks,
            LR_MODE=mode, DT=_TL_DTYPE[spec.dtype], BLOCK=BLOCK,
        )
    if mode == codes.SGD_KERNEL_LR_BROADCAST and dlr_buffers:
        _sum_partials_kernel[(spec.n,)](partials, segments, dlr_buffers[0], BLOCK=BLOCK_REDUCE)
