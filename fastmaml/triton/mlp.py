"""Triton kernels for the per-task batched MLP: loss, gradient and Hessian-vector product.

Same signatures and conventions as :mod:`fastmaml.reference.mlp` (minus ``backend``):
weights ``W_l: [T, out_l, in_l]``, biases ``b_l: [T, out_l]``, inputs ``x: [T, N, in_1]``,
targets ``y: [T, N, out_L]`` (float, ``mse``) or ``[T, N]`` (int64 labels,
``cross_entropy``); hidden layers ReLU or tanh, last layer linear, per-task loss = mean.

Design. Every kernel is a batched per-task matrix product: the task index is grid axis 0,
the output tile indices are grid axis 1 (and 2), and a ``tl.dot`` loop runs over the
reduction dimension, so a task never has to fit on chip and any width works. The
elementwise work is fused into the prologues/epilogues of those products:

- ``_mlp_fwd_kernel`` (hidden layer l): ``z = h Wᵀ + b``, ``h' = σ(z)``; for the HVP also
  ``R{z} = R{h} Wᵀ + h R{W}ᵀ + R{b}`` in the same tiles (two dots into one accumulator),
  with ``R{h} = σ'(z_prev) R{z_prev}`` formed in the prologue from the stored activation.
- ``_mlp_head_kernel`` (last layer + loss): ``z_L = h Wᵀ + b`` (and ``R{z_L}``) with the
  whole class/output row in one tile, then the per-task partial loss, ``δ_L = ∂ℓ/∂z_L``
  and ``R{δ_L} = ∂²ℓ/∂z_L² R{z_L}`` in the epilogue; ``z_L`` is never written to memory.
  When one row tile covers all N points of a task (N ≤ 16 under the interpreter and in
  float64; in float32 on a GPU N ≤ 128 for ≤ 64 outputs, fewer for wider heads), the
  program holds the task's whole δ_L and also does layer L's backward (``dW_L``,
  ``db_L``, ``δ_{L−1}`` and their R-terms): δ_L never touches memory.
- ``_mlp_bwd_kernel`` (layer l, one launch): its grid holds two kinds of tiles, the
  weight-gradient tiles ``dW = δᵀ h``, ``db = Σ_n δ`` (HVP: ``R{dW} = R{δ}ᵀ h + δᵀ R{h}``,
  ``R{db} = Σ_n R{δ}``) and the tiles of the next delta
  ``δ_prev = (δ W) ⊙ σ'(z_prev)`` (HVP: ``R{δ_prev} = (R{δ} W + δ R{W}) ⊙ σ' +
  (δ W) ⊙ σ'' ⊙ R{z_prev}``) — both read the same δ, so one launch does both.

Only ``h_l`` (post-activation) is stored per hidden layer: ``σ'`` and ``σ''`` are
recomputed from it (ReLU: ``σ' = [h > 0]``, ``σ'' = 0``; tanh: ``σ' = 1 − h²``,
``σ'' = −2h(1 − h²)``); the HVP stores ``R{z_l}`` as well, and forms ``R{h} = σ' R{z}``
in the prologues that read it. Launches per call for an L-layer MLP: ``(L − 1)``
forward + 1 head + ``(L − 1)`` backward = ``2L − 1`` when the head does layer L's
backward, else ``2L`` (plus one small torch sum of the per-row-tile partial losses when
N spans several row tiles). ``mlp_hvp`` is one such sequence too (forward and R-forward
share tiles, as do backward and R-backward); it does not compute the gradient itself,
only the deltas the R-terms need.

Precision. float32 inputs: ``tl.dot`` on float32 tiles with ``input_precision="ieee"``
(no TF32), float32 accumulation. float64 inputs: ``tl.dot`` is not used; the tile
product is ``tl.sum(a[:, :, None] * b[None, :, :], axis=1)`` in float64, so results agree
with float64 PyTorch to rounding (slow on a GPU: float64 is a correctness path).

Limits. The last layer's width (outputs/classes) is held in one tile:
``out_L ≤ MAX_HEAD_WIDTH`` (1024). Hidden widths, N and T are otherwise unbounded (task
offsets are int64; offsets within a task are int32, so each per-task tensor must hold
< 2³¹ elements).
CPU tensors run only under ``TRITON_INTERPRET=1`` (tests). tanh is written with ``exp``
(no libdevice).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from fastmaml import _checks, codes

ACTIVATIONS = tuple(codes.ACTIVATION)
LOSSES = tuple(codes.LOSS)
# the activation / loss codes (fastmaml.codes) the kernels branch on, as compile-time constants
_TANH = tl.constexpr(codes.ACTIVATION["tanh"])
_MSE = tl.constexpr(codes.LOSS["mse"])
MAX_HEAD_WIDTH = 1024


# ----------------------------------------------------------------------------- helpers


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Device functions called from the kernels. Compiled, they are @triton.jit functions
# (inlined by the compiler). Under TRITON_INTERPRET=1 the same source runs as plain
# Python functions: the interpreter re-patches triton.language on every nested @jit
# call (several ms each), which would dominate the tests' run time.
_device_fn = (lambda fn: fn) if _interpreted() else triton.jit


@_device_fn
def _mm(a, b, IS_FP64: tl.constexpr):
    """Tile product a @ b: float32 tl.dot (IEEE, no TF32), or exact float64 broadcast-sum."""
    if IS_FP64:
        r = tl.sum(a[:, :, None] * b[None, :, :], axis=1)  # Σ_k a[i,k] b[k,j] in float64
    else:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return r


@_device_fn
def _tanh(z):
    e = tl.exp(-2.0 * tl.abs(z))  # in (0, 1]: no overflow
    t = (1.0 - e) / (1.0 + e)  # tanh|z| = (1 − e^{−2|z|}) / (1 + e^{−2|z|})
    return tl.where(z >= 0, t, -t)


@_device_fn
def _act(z, ACT: tl.constexpr):
    if ACT == _TANH:
        r = _tanh(z)  # σ(z) = tanh z
    else:
        r = tl.where((z > 0) | (z != z), z, 0.0)  # σ(z) = max(z, 0); NaN stays NaN, as torch.relu
    return r


@_device_fn
def _act_grad(h, ACT: tl.constexpr):
    """σ'(z) from the stored activation h = σ(z)."""
    if ACT == _TANH:
        r = 1.0 - h * h  # tanh' = 1 − tanh²
    else:
        r = (h > 0).to(h.dtype)  # relu' = [z > 0] = [h > 0]
    return r


@_device_fn
def _linear_tile(
    hp_ptr, rzp_ptr, w_ptr, vw_ptr, rows, cols, N, K, M,
    ACT: tl.constexpr, PREV_ACT: tl.constexpr, HVP: tl.constexpr, IS_FP64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Accumulators of one [rows × cols] tile of h Wᵀ and (HVP) R{h} Wᵀ + h R{W}ᵀ.
    h: [N, K], W: [M, K] (pointers already offset to the task)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=hp_ptr.dtype.element_ty)
    racc = tl.zeros((BLOCK_M, BLOCK_N), dtype=hp_ptr.dtype.element_ty)
    rmask = rows < N
    cmask = cols < M
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        h_off = rows[:, None] * K + ks[None, :]
        h_msk = rmask[:, None] & kmask[None, :]
        w_off = cols[None, :] * K + ks[:, None]  # W[j, k] read as the [k, j] tile of Wᵀ
        w_msk = cmask[None, :] & kmask[:, None]
        h = tl.load(hp_ptr + h_off, mask=h_msk, other=0.0)
        wt = tl.load(w_ptr + w_off, mask=w_msk, other=0.0)
        acc += _mm(h, wt, IS_FP64)  # z = h_{l−1} W_lᵀ
        if HVP:
            vwt = tl.load(vw_ptr + w_off, mask=w_msk, other=0.0)
            racc += _mm(h, vwt, IS_FP64)  # R{z} += h_{l−1} R{W_l}ᵀ
            if PREV_ACT:
                rzp = tl.load(rzp_ptr + h_off, mask=h_msk, other=0.0)
                rh = _act_grad(h, ACT) * rzp  # R{h_{l−1}} = σ'(z_{l−1}) R{z_{l−1}}
                racc += _mm(rh, wt, IS_FP64)  # R{z} += R{h_{l−1}} W_lᵀ
    return acc, racc


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _mlp_fwd_kernel(
    hp_ptr, rzp_ptr, w_ptr, b_ptr, vw_ptr, vb_ptr, h_ptr, rz_ptr, N, K, M,
    ACT: tl.constexpr, PREV_ACT: tl.constexpr, HVP: tl.constexpr, IS_FP64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # one grid axis (task, row tile, column tile): axes 1/2 are limited to 65,535 programs
    tiles_n = tl.cdiv(M, BLOCK_N)
    per_task = tl.cdiv(N, BLOCK_M) * tiles_n
    pid = tl.program_id(0)
    t = (pid // per_task).to(tl.int64)
    r = pid % per_task
    rows = (r // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)  # points n
    cols = (r % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)  # output units j
    acc, racc = _linear_tile(
        hp_ptr + t * N * K, rzp_ptr + t * N * K, w_ptr + t * M * K, vw_ptr + t * M * K, rows, cols, N, K, M,
        ACT, PREV_ACT, HVP, IS_FP64, BLOCK_M, BLOCK_N, BLOCK_K,
    )
    cmask = cols < M
    omask = (rows < N)[:, None] & cmask[None, :]
    o_off = t * N * M + rows[:, None] * M + cols[None, :]
    b = tl.load(b_ptr + t * M + cols, mask=cmask, other=0.0)
    z = acc + b[None, :]  # z_l = h_{l−1} W_lᵀ + b_l
    tl.store(h_ptr + o_off, _act(z, ACT).to(h_ptr.dtype.element_ty), mask=omask)  # h_l = σ(z_l)
    if HVP:
        vb = tl.load(vb_ptr + t * M + cols, mask=cmask, other=0.0)
        rz = racc + vb[None, :]  # R{z_l} = R{h_{l−1}} W_lᵀ + h_{l−1} R{W_l}ᵀ + R{b_l}
        tl.store(rz_ptr + o_off, rz.to(rz_ptr.dtype.element_ty), mask=omask)


@_device_fn
def _head_bwd(
    t, rows, cols, d, rd, hp_ptr, rzp_ptr, w_ptr, vw_ptr, gw_ptr, gb_ptr, dp_ptr, rdp_ptr, N, K, C,
    ACT: tl.constexpr, PREV_ACT: tl.constexpr, HVP: tl.constexpr, IS_FP64: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Layer L's backward from the task's whole δ_L ``[rows × cols]`` held in registers
    (only when one row block covers all N points): dW_L, db_L and δ_{L−1} (HVP: their
    R{·}). hp/rzp: ``[N, K]``, W: ``[C, K]`` per task."""
    rmask = rows < N
    cmask = cols < C
    dt = tl.trans(d)  # δ_Lᵀ [C, N]
    if HVP:
        rdt = tl.trans(rd)
        gb = tl.sum(rd, axis=0)  # R{db_L} = Σ_n R{δ_L}
    else:
        gb = tl.sum(d, axis=0)  # db_L = Σ_n δ_L
    tl.store(gb_ptr + t * C + cols, gb.to(gb_ptr.dtype.element_ty), mask=cmask)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        h_off = t * N * K + rows[:, None] * K + ks[None, :]
        h_msk = rmask[:, None] & kmask[None, :]
        w_off = t * C * K + cols[:, None] * K + ks[None, :]
        w_msk = cmask[:, None] & kmask[None, :]
        h = tl.load(hp_ptr + h_off, mask=h_msk, other=0.0)
        if HVP:
            g = _mm(rdt, h, IS_FP64)  # R{dW_L} = R{δ_L}ᵀ h_{L−1}
            if PREV_ACT:
                rz = tl.load(rzp_ptr + h_off, mask=h_msk, other=0.0)
                g += _mm(dt, _act_grad(h, ACT) * rz, IS_FP64)  # + δ_Lᵀ R{h_{L−1}}, R{h} = σ' R{z}
        else:
            g = _mm(dt, h, IS_FP64)  # dW_L = δ_Lᵀ h_{L−1}
        tl.store(gw_ptr + w_off, g.to(gw_ptr.dtype.element_ty), mask=w_msk)
        if PREV_ACT:
            w = tl.load(w_ptr + w_off, mask=w_msk, other=0.0)
            a = _mm(d, w, IS_FP64)  # δ_L W_L
            s1 = _act_grad(h, ACT)
            tl.store(dp_ptr + h_off, (a * s1).to(dp_ptr.dtype.element_ty), mask=h_msk)  # δ_{L−1} = (δ_L W_L) ⊙ σ'
            if HVP:
                vw = tl.load(vw_ptr + w_off, mask=w_msk, other=0.0)
                ra = _mm(rd, w, IS_FP64) + _mm(d, vw, IS_FP64)  # R{δ_L} W_L + δ_L R{W_L}
                rdp = ra * s1
                if ACT == _TANH:
                    rdp += a * (-2.0 * h * s1) * rz  # + (δ_L W_L) ⊙ σ'' ⊙ R{z_{L−1}}, tanh'' = −2 tanh (1 − tanh²)
                tl.store(rdp_ptr + h_off, rdp.to(rdp_ptr.dtype.element_ty), mask=h_msk)  # R{δ_{L−1}}


@triton.jit
def _mlp_head_kernel(
    hp_ptr, rzp_ptr, w_ptr, b_ptr, vw_ptr, vb_ptr, y_ptr, part_ptr, d_ptr, rd_ptr,
    gw_ptr, gb_ptr, dp_ptr, rdp_ptr, N, K, C,
    LOSS: tl.constexpr, ACT: tl.constexpr, PREV_ACT: tl.constexpr, HVP: tl.constexpr, IS_FP64: tl.constexpr,
    FUSE_BWD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    n_rb = tl.cdiv(N, BLOCK_M)  # one grid axis (task, row block): axis 1 is limited to 65,535
    pid = tl.program_id(0)
    t = (pid // n_rb).to(tl.int64)
    pid_m = pid % n_rb
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # points n
    cols = tl.arange(0, BLOCK_C)  # all outputs / classes c of the row
    acc, racc = _linear_tile(
        hp_ptr + t * N * K, rzp_ptr + t * N * K, w_ptr + t * C * K, vw_ptr + t * C * K, rows, cols, N, K, C,
        ACT, PREV_ACT, HVP, IS_FP64, BLOCK_M, BLOCK_C, BLOCK_K,
    )
    rmask = rows < N
    cmask = cols < C
    mask = rmask[:, None] & cmask[None, :]
    z = acc + tl.load(b_ptr + t * C + cols, mask=cmask, other=0.0)[None, :]  # z_L = h_{L−1} W_Lᵀ + b_L
    rz = tl.where(mask, racc + tl.load(vb_ptr + t * C + cols, mask=cmask, other=0.0)[None, :], 0.0)  # R{z_L}
    if LOSS == _MSE:
        o_off = t * N * C + rows[:, None] * C + cols[None, :]
        diff = tl.where(mask, z - tl.load(y_ptr + o_off, mask=mask, other=0.0), 0.0)  # z − y
        loss = tl.sum(tl.sum(diff * diff, axis=1), axis=0) / (N * C)  # Σ (z − y)² / (N·C), this row block
        d = diff * 2.0 / (N * C)  # δ_L = ∂ℓ/∂z_L = 2(z − y)/(N·C)
        rd = rz * 2.0 / (N * C)  # R{δ_L} = (2/(N·C)) I · R{z_L}
    else:
        lbl = tl.load(y_ptr + t * N + rows, mask=rmask, other=0)
        zm = tl.where(cmask[None, :], z, float("-inf"))
        mx = tl.max(zm, axis=1)
        e = tl.exp(zm - mx[:, None])  # padded classes: exp(−inf) = 0
        s = tl.sum(e, axis=1)
        p = e / s[:, None]  # p = softmax(z_L) per point
        onehot = (cols[None, :] == lbl[:, None]).to(p.dtype)
        zy = tl.sum(tl.where(mask, z * onehot, 0.0), axis=1)  # z_n[y_n]
        lrow = mx + tl.log(s) - zy  # ℓ_n = logsumexp(z_n) − z_n[y_n]
        loss = tl.sum(tl.where(rmask, lrow, 0.0), axis=0) / N  # Σ_n ℓ_n / N, this row block
        d = tl.where(mask, (p - onehot) / N, 0.0)  # δ_L = (p − onehot(y)) / N
        prz = tl.sum(p * rz, axis=1)  # pᵀ R{z_L}
        rd = tl.where(mask, p * (rz - prz[:, None]) / N, 0.0)  # R{δ_L} = (diag(p) − p pᵀ) R{z_L} / N
    if not HVP:
        tl.store(part_ptr + t * n_rb + pid_m, loss)
    if FUSE_BWD:
        _head_bwd(
            t, rows, cols, d, rd, hp_ptr, rzp_ptr, w_ptr, vw_ptr, gw_ptr, gb_ptr, dp_ptr, rdp_ptr, N, K, C,
            ACT, PREV_ACT, HVP, IS_FP64, BLOCK_K,
        )
    else:
        o_off = t * N * C + rows[:, None] * C + cols[None, :]
        tl.store(d_ptr + o_off, d.to(d_ptr.dtype.element_ty), mask=mask)
        if HVP:
            tl.store(rd_ptr + o_off, rd.to(rd_ptr.dtype.element_ty), mask=mask)


@_device_fn
def _gw_tile(
    t, p, d_ptr, rd_ptr, hp_ptr, rzp_ptr, gw_ptr, gb_ptr, N, K, M,
    ACT: tl.constexpr, PREV_ACT: tl.constexpr, HVP: tl.constexpr, IS_FP64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One [out × in] tile of dW_l = δ_lᵀ h_{l−1} and its slice of db_l = Σ_n δ_l
    (HVP: of R{dW_l} and R{db_l}). δ: [N, M], h: [N, K]."""
    n_k = (K + BLOCK_N - 1) // BLOCK_N  # tiles along `in`
    outs = (p // n_k) * BLOCK_M + tl.arange(0, BLOCK_M)  # output units o
    ins = (p % n_k) * BLOCK_N + tl.arange(0, BLOCK_N)  # input units i
    omask = outs < M
    imask = ins < K
    d_ptr += t * N * M
    rd_ptr += t * N * M
    hp_ptr += t * N * K
    rzp_ptr += t * N * K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=hp_ptr.dtype.element_ty)
    bacc = tl.zeros((BLOCK_M,), dtype=hp_ptr.dtype.element_ty)
    for n0 in range(0, N, BLOCK_K):
        ns = n0 + tl.arange(0, BLOCK_K)
        nmask = ns < N
        dt_off = ns[None, :] * M + outs[:, None]  # δ[n, o] read as the [o, n] tile of δᵀ
        dt_msk = nmask[None, :] & omask[:, None]
        h_off = ns[:, None] * K + ins[None, :]
        h_msk = nmask[:, None] & imask[None, :]
        dt = tl.load(d_ptr + dt_off, mask=dt_msk, other=0.0)
        h = tl.load(hp_ptr + h_off, mask=h_msk, other=0.0)
        if HVP:
            rdt = tl.load(rd_ptr + dt_off, mask=dt_msk, other=0.0)
            acc += _mm(rdt, h, IS_FP64)  # R{dW} += R{δ}ᵀ h
            if PREV_ACT:
                rh = _act_grad(h, ACT) * tl.load(rzp_ptr + h_off, mask=h_msk, other=0.0)  # R{h} = σ' R{z}
                acc += _mm(dt, rh, IS_FP64)  # R{dW} += δᵀ R{h}
            bacc += tl.sum(rdt, axis=1)  # R{db} = Σ_n R{δ}
        else:
            acc += _mm(dt, h, IS_FP64)  # dW = δᵀ h
            bacc += tl.sum(dt, axis=1)  # db = Σ_n δ
    g_off = t * M * K + outs[:, None] * K + ins[None, :]
    tl.store(gw_ptr + g_off, acc.to(gw_ptr.dtype.element_ty), mask=omask[:, None] & imask[None, :])
    # every tile along `in` computes the same bias slice; the first one writes it
    tl.store(gb_ptr + t * M + outs, bacc.to(gb_ptr.dtype.element_ty), mask=omask & ((outs * 0 + p % n_k) == 0))


@_device_fn
def _dprev_tile(
    t, q, d_ptr, rd_ptr, w_ptr, vw_ptr, hp_ptr, rzp_ptr, dp_ptr, rdp_ptr, N, K, M,
    ACT: tl.constexpr, HVP: tl.constexpr, IS_FP64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One [points × in] tile of δ_{l−1} = (δ_l W_l) ⊙ σ'(z_{l−1}) (HVP: and R{δ_{l−1}}).
    δ: [N, M], W: [M, K], h_{l−1}: [N, K]."""
    n_k = (K + BLOCK_N - 1) // BLOCK_N  # tiles along `in`
    rows = (q // n_k) * BLOCK_M + tl.arange(0, BLOCK_M)  # points n
    ins = (q % n_k) * BLOCK_N + tl.arange(0, BLOCK_N)  # input units i
    rmask = rows < N
    imask = ins < K
    d_ptr += t * N * M
    rd_ptr += t * N * M
    w_ptr += t * M * K
    vw_ptr += t * M * K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=hp_ptr.dtype.element_ty)
    racc = tl.zeros((BLOCK_M, BLOCK_N), dtype=hp_ptr.dtype.element_ty)
    for o0 in range(0, M, BLOCK_K):
        os_ = o0 + tl.arange(0, BLOCK_K)
        o_msk = os_ < M
        d_off = rows[:, None] * M + os_[None, :]
        d_msk = rmask[:, None] & o_msk[None, :]
        w_off = os_[:, None] * K + ins[None, :]
        w_msk = o_msk[:, None] & imask[None, :]
        d = tl.load(d_ptr + d_off, mask=d_msk, other=0.0)
        w = tl.load(w_ptr + w_off, mask=w_msk, other=0.0)
        acc += _mm(d, w, IS_FP64)  # δ_l W_l
        if HVP:
            rd = tl.load(rd_ptr + d_off, mask=d_msk, other=0.0)
            vw = tl.load(vw_ptr + w_off, mask=w_msk, other=0.0)
            racc += _mm(rd, w, IS_FP64)  # R{δ_l} W_l
            racc += _mm(d, vw, IS_FP64)  # + δ_l R{W_l}
    p_off = t * N * K + rows[:, None] * K + ins[None, :]
    p_msk = rmask[:, None] & imask[None, :]
    h = tl.load(hp_ptr + p_off, mask=p_msk, other=0.0)
    s1 = _act_grad(h, ACT)
    tl.store(dp_ptr + p_off, (acc * s1).to(dp_ptr.dtype.element_ty), mask=p_msk)  # δ_{l−1} = (δ_l W_l) ⊙ σ'(z_{l−1})
    if HVP:
        rdp = racc * s1  # (R{δ_l} W_l + δ_l R{W_l}) ⊙ σ'(z_{l−1})
        if ACT == _TANH:
            rzp = tl.load(rzp_ptr + p_off, mask=p_msk, other=0.0)
            rdp += acc * (-2.0 * h * s1) * rzp  # + (δ_l W_l) ⊙ σ''(z_{l−1}) ⊙ R{z_{l−1}}, tanh'' = −2 tanh (1 − tanh²)
        tl.store(rdp_ptr + p_off, rdp.to(rdp_ptr.dtype.element_ty), mask=p_msk)  # R{δ_{l−1}} (ReLU: σ'' = 0)


@triton.jit
def _mlp_bwd_kernel(
    d_ptr, rd_ptr, w_ptr, vw_ptr, hp_ptr, rzp_ptr, gw_ptr, gb_ptr, dp_ptr, rdp_ptr, N, K, M, n_gw_tiles,
    ACT: tl.constexpr, PREV_ACT: tl.constexpr, HVP: tl.constexpr, IS_FP64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # one grid axis (task, tile): axis 1 is limited to 65,535 programs
    if PREV_ACT:
        per_task = n_gw_tiles + tl.cdiv(N, BLOCK_M) * tl.cdiv(K, BLOCK_N)
    else:
        per_task = n_gw_tiles
    pid = tl.program_id(0)
    t = (pid // per_task).to(tl.int64)
    p = pid % per_task
    # programs [0, n_gw_tiles) make the weight/bias gradient, the rest (only when a
    # previous hidden layer exists) the previous layer's delta: both read δ_l.
    if p < n_gw_tiles:
        _gw_tile(
            t, p, d_ptr, rd_ptr, hp_ptr, rzp_ptr, gw_ptr, gb_ptr, N, K, M,
            ACT, PREV_ACT, HVP, IS_FP64, BLOCK_M, BLOCK_N, BLOCK_K,
        )
    else:
        if PREV_ACT:
            _dprev_tile(
                t, p - n_gw_tiles, d_ptr, rd_ptr, w_ptr, vw_ptr, hp_ptr, rzp_ptr, dp_ptr, rdp_ptr, N, K, M,
                ACT, HVP, IS_FP64, BLOCK_M, BLOCK_N, BLOCK_K,
            )


# ----------------------------------------------------------------------------- launchers


def _blocks(device: torch.device, dtype: torch.dtype, rows: int, cols: int) -> tuple[int, int, int]:
    """Tile sizes (BLOCK_M rows, BLOCK_N cols, BLOCK_K reduction); all ≥ 16 for tl.dot."""
    if device.type != "cuda" or dtype == torch.float64:
        # interpreter: fewest, smallest programs; float64 on GPU: the [M, K, N] broadcast
        # product must stay small (4096 elements)
        return 16, 16, 16
    bm = min(64, max(16, triton.next_power_of_2(rows)))
    bn = min(64, max(16, triton.next_power_of_2(cols)))
    return bm, bn, 32


def _head_blocks(device: torch.device, dtype: torch.dtype, n: int, c: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_C, BLOCK_K) of the head: a row holds all C outputs; on a GPU the
    row block grows to 128 points when C is small, so that one block covers a task."""
    bc = max(16, triton.next_power_of_2(c))
    if device.type != "cuda":
        return 16, bc, 16
    if dtype == torch.float64:
        return 16, bc, max(1, 4096 // (16 * bc))  # keep the broadcast product at ≤ 4096 elements
    bm = min(128, max(16, triton.next_power_of_2(n)), max(16, 8192 // bc))
    return bm, bc, 32 if bc <= 128 else 16


def _grid(T: int, per_task: int) -> tuple[int]:
    """The launch grid: tasks × tiles folded into axis 0 (up to 2^31 − 1 programs; axes 1
    and 2 of a CUDA grid stop at 65,535, which large tasks would pass)."""
    n = T * per_task
    if n >= 2**31:
        raise ValueError(f"the triton backend launches one program per task and tile: {T} tasks × {per_task} tiles "
                         f"= {n} exceeds the grid's 2**31 - 1; split the tasks into smaller batches")
    return (n,)


def _head_options(device: torch.device, dtype: torch.dtype, block_c: int, hvp: bool) -> dict:
    """Launch options of the head kernel. A float32 HVP head wider than 512 outputs keeps
    its tiles in one pipeline stage: with Triton's default 3 stages it needs 405,504 B of
    shared memory at 1,024 outputs, past the 232,448 B of an sm_90 block; 1 stage: 196,608 B."""
    if device.type == "cuda" and hvp and dtype == torch.float32 and block_c > 512:
        return {"num_stages": 1}
    return {}


def _fwd(hp, rzp, W, b, vW, vb, act: int, prev_act: bool, hvp: bool):
    """Hidden layer: h = σ(hp Wᵀ + b) ``[T, N, M]`` and (HVP) R{z} ``[T, N, M]``.
    hp/rzp: ``[T, N, K]``, W/vW: ``[T, M, K]``, b/vb: ``[T, M]``; rzp used iff hvp and prev_act."""
    T, N, K = hp.shape
    M = W.shape[1]
    h = torch.empty(T, N, M, device=hp.device, dtype=hp.dtype)
    rz = torch.empty_like(h) if hvp else h
    bm, bn, bk = _blocks(hp.device, hp.dtype, N, M)
    grid = _grid(T, triton.cdiv(N, bm) * triton.cdiv(M, bn))
    _mlp_fwd_kernel[grid](
        hp, rzp if rzp is not None else hp, W, b, vW if hvp else W, vb if hvp else b, h, rz, N, K, M,
        ACT=act, PREV_ACT=prev_act, HVP=hvp, IS_FP64=hp.dtype == torch.float64,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
    )
    return h, (rz if hvp else None)


def _head(hp, rzp, W, b, vW, vb, y, act: int, prev_act: bool, hvp: bool, loss: int):
    """Last layer + loss (+ layer L's backward when one row block covers the N points).

    hp/rzp ``[T, N, K]``, W/vW ``[T, C, K]``, b/vb ``[T, C]``, y ``[T, N, C]`` float (mse)
    or ``[T, N]`` int64 (cross_entropy). Returns ``(loss [T] or None when hvp, δ_L,
    R{δ_L}, fused)``: δ_L/R{δ_L} ``[T, N, C]`` (None when fused); fused is None, or
    ``(dW_L, db_L, δ_{L−1}, R{δ_{L−1}})`` (HVP: R{dW_L}, R{db_L}) made by this launch.
    """
    T, N, K = hp.shape
    C = W.shape[1]
    bm, bc, bk = _head_blocks(hp.device, hp.dtype, N, C)
    n_rb = triton.cdiv(N, bm)
    fuse = n_rb == 1  # the program holds the task's whole δ_L: finish layer L here
    part = torch.empty(T, n_rb, device=hp.device, dtype=hp.dtype)
    if fuse:
        d = rd = None
        gw, gb = torch.empty_like(W), torch.empty_like(b)
        dp = torch.empty_like(hp) if prev_act else None
        rdp = torch.empty_like(hp) if prev_act and hvp else None
    else:
        d = torch.empty(T, N, C, device=hp.device, dtype=hp.dtype)
        rd = torch.empty_like(d) if hvp else None
        gw = gb = dp = rdp = None
    dummy = part  # any tensor of the dtype for pointers a variant never touches
    _mlp_head_kernel[_grid(T, n_rb)](
        hp, rzp if rzp is not None else hp, W, b, vW if hvp else W, vb if hvp else b, y, part,
        d if d is not None else dummy, rd if rd is not None else dummy,
        gw if gw is not None else dummy, gb if gb is not None else dummy,
        dp if dp is not None else dummy, rdp if rdp is not None else dummy, N, K, C,
        LOSS=loss, ACT=act, PREV_ACT=prev_act, HVP=hvp, IS_FP64=hp.dtype == torch.float64,
        FUSE_BWD=fuse, BLOCK_M=bm, BLOCK_C=bc, BLOCK_K=bk, **_head_options(hp.device, hp.dtype, bc, hvp),
    )
    lt = None
    if not hvp:
        # per-row-block partial losses, summed in a fixed order (deterministic)
        lt = part[:, 0] if n_rb == 1 else part.sum(1)
    return lt, d, rd, ((gw, gb, dp, rdp) if fuse else None)


def _bwd(d, rd, W, vW, hp, rzp, act: int, prev_act: bool, hvp: bool):
    """Backward through layer l: (dW ``[T, M, K]``, db ``[T, M]``, δ_{l−1} ``[T, N, K]`` or
    None, R{δ_{l−1}} or None); in HVP mode dW/db are R{dW}/R{db}. d/rd: ``[T, N, M]``,
    W/vW: ``[T, M, K]``, hp/rzp: ``[T, N, K]``; δ_{l−1} is made iff prev_act."""
    T, N, M = d.shape
    K = W.shape[2]
    bm, bn, bk = _blocks(d.device, d.dtype, max(M, N), K)
    gw = torch.empty_like(W)
    gb = torch.empty(T, M, device=d.device, dtype=d.dtype)
    n_gw = triton.cdiv(M, bm) * triton.cdiv(K, bn)
    n_dp = triton.cdiv(N, bm) * triton.cdiv(K, bn) if prev_act else 0
    dp = torch.empty_like(hp) if prev_act else None
    rdp = torch.empty_like(hp) if prev_act and hvp else None
    _mlp_bwd_kernel[_grid(T, n_gw + n_dp)](
        d, rd if hvp else d, W, vW if hvp else W, hp, rzp if rzp is not None else hp, gw, gb,
        dp if dp is not None else gw, rdp if rdp is not None else gw, N, K, M, n_gw,
        ACT=act, PREV_ACT=prev_act, HVP=hvp, IS_FP64=d.dtype == torch.float64,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
    )
    return gw, gb, dp, rdp


# ----------------------------------------------------------------------------- public functions


def _prepare(weights, biases, x, y, activation, loss, v_weights=None, v_biases=None):
    """Validate the inputs (naming the argument) and return contiguous, detached copies or views."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    ws = _checks.tensor_list("weights", weights)
    bs = _checks.tensor_list("biases", biases)
    if len(bs) != len(ws):
        raise ValueError(f"biases must hold one tensor per weight ({len(ws)}), got {len(bs)}")
    x = _checks.tensor("x", x)
    y = _checks.tensor("y", y)
    _checks.float_dtype("x", x)
    dt, dev = x.dtype, x.device
    if dev.type == "cpu" and not _interpreted():
        raise RuntimeError("fastmaml.triton.mlp: CPU tensors need TRITON_INTERPRET=1 (set before triton is imported)")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"x must be on a CUDA device (or the CPU under TRITON_INTERPRET=1), got {dev}")
    if x.dim() != 3:
        raise ValueError(f"x must have shape [T, N, in], got {tuple(x.shape)}")
    T, N, width = x.shape
    if T < 1 or N < 1 or width < 1:
        raise ValueError(f"x must have T >= 1 tasks, N >= 1 points and in >= 1 features, got {tuple(x.shape)}")
    vws = vbs = None
    if v_weights is not None:
        vws = _checks.tensor_list("v_weights", v_weights)
        vbs = _checks.tensor_list("v_biases", v_biases)
        if len(vws) != len(ws) or len(vbs) != len(ws):
            raise ValueError(
                f"v_weights and v_biases must hold {len(ws)} tensors like weights, got {len(vws)} and {len(vbs)}"
            )
    for l, (W, b) in enumerate(zip(ws, bs)):
        _checks.float_dtype(f"weights[{l}]", W, dt)
        _checks.float_dtype(f"biases[{l}]", b, dt)
        _checks.same_device(f"weights[{l}]", W, dev)
        _checks.same_device(f"biases[{l}]", b, dev)
        if W.dim() != 3 or W.shape[0] != T or W.shape[2] != width or W.shape[1] < 1:
            raise ValueError(
                f"weights[{l}] must have shape [T={T}, out, in={width}] with out >= 1, got {tuple(W.shape)}"
            )
        _checks.shape(f"biases[{l}]", b, (T, W.shape[1]))
        if vws is not None:
            for name, v, p in ((f"v_weights[{l}]", vws[l], W), (f"v_biases[{l}]", vbs[l], b)):
                _checks.float_dtype(name, v, dt)
                _checks.same_device(name, v, dev)
                _checks.shape(name, v, p.shape)
        width = W.shape[1]
    C = width
    widths = [x.shape[2]] + [W.shape[1] for W in ws]
    biggest = max([N * w for w in widths] + [W.shape[1] * W.shape[2] for W in ws])
    if biggest >= 2**31:  # offsets inside one task are int32 in the kernels
        raise ValueError(f"each task's tensors must hold < 2**31 elements on the triton backend, got {biggest}")
    if C > MAX_HEAD_WIDTH:
        raise ValueError(
            f"the last layer's width must be <= {MAX_HEAD_WIDTH} (one tile) on the triton backend, got {C}"
        )
    _checks.same_device("y", y, dev)
    if loss == "mse":
        _checks.float_dtype("y", y, dt)
        _checks.shape("y", y, (T, N, C))
    else:
        if y.dtype != torch.int64:
            raise TypeError(f"y must be int64 class labels for loss='cross_entropy', got {y.dtype}")
        _checks.shape("y", y, (T, N))
        if bool(((y < 0) | (y >= C)).any()):
            raise ValueError(f"y holds class labels outside [0, {C}): min {int(y.min())}, max {int(y.max())}")
    c = lambda t: t.detach().contiguous()  # noqa: E731
    ws, bs, x, y = [c(W) for W in ws], [c(b) for b in bs], c(x), c(y)
    if vws is not None:
        vws, vbs = [c(v) for v in vws], [c(v) for v in vbs]
    return ws, bs, x, y, vws, vbs


def _run(ws, bs, x, y, vws, vbs, activation: str, loss: str):
    hvp = vws is not None
    act = codes.ACTIVATION[activation]
    lo = codes.LOSS[loss]
    L = len(ws)
    if not hvp:
        vws, vbs = [None] * L, [None] * L
    hs, rzs = [x], [None]  # h_0 = x, R{h_0} = 0
    for l in range(L - 1):  # hidden layers
        h, rz = _fwd(hs[-1], rzs[-1], ws[l], bs[l], vws[l], vbs[l], act, l > 0, hvp)
        hs.append(h)
        rzs.append(rz)
    lt, d, rd, fused = _head(hs[-1], rzs[-1], ws[-1], bs[-1], vws[-1], vbs[-1], y, act, L > 1, hvp, lo)
    gws, gbs = [None] * L, [None] * L
    top = L - 1
    if fused is not None:  # layer L's backward was done by the head
        gws[top], gbs[top], d, rd = fused
        top -= 1
    for l in range(top, -1, -1):
        gws[l], gbs[l], d, rd = _bwd(d, rd, ws[l], vws[l], hs[l], rzs[l], act, l > 0, hvp)
    return lt, gws, gbs


def mlp_loss_and_grad(
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    activation: str = "relu",
    loss: str = "mse",
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Per-task loss ``[T]`` and gradients ``[T, out, in]`` / ``[T, out]`` of an MLP.

    weights[l]: ``[T, out_l, in_l]``, biases[l]: ``[T, out_l]``, x: ``[T, N, in_1]``,
    y: ``[T, N, out_L]`` float (mse) or ``[T, N]`` int64 (cross_entropy); float32 or
    float64, all on one CUDA device (CPU under ``TRITON_INTERPRET=1``). ``2L − 1`` launches
    (``2L`` when N exceeds one head row tile).
    """
    ws, bs, x, y, _, _ = _prepare(weights, biases, x, y, activation, loss)
    with torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext():
        return _run(ws, bs, x, y, None, None, activation, loss)


def mlp_hvp(
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    v_weights: Sequence[torch.Tensor],
    v_biases: Sequence[torch.Tensor],
    *,
    activation: str = "relu",
    loss: str = "mse",
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-task Hessian-vector product H_t v_t of the per-task loss, by the R-operator.

    Shapes as :func:`mlp_loss_and_grad`; v_weights/v_biases have the shapes of
    weights/biases. Returns (Hv for each weight ``[T, out, in]``, for each bias
    ``[T, out]``). ``2L − 1`` (or ``2L``) launches, as :func:`mlp_loss_and_grad`: forward and
    R-forward share tiles, as do backward and R-backward.
    """
    ws, bs, x, y, vws, vbs = _prepare(weights, biases, x, y, activation, loss, v_weights, v_biases)
    with torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext():
        _, hw, hb = _run(ws, bs, x, y, vws, vbs, activation, loss)
    return hw, hb


__all__ = ["mlp_loss_and_grad", "mlp_hvp", "MAX_HEAD_WIDTH"]
