"""Whether an MLP fits the fused ``maml_mlp`` kernel: the op-level fit checks
(:func:`fused_workspace_bytes`, :func:`fused_limits`, :func:`fits_fused`). Which models
take the fused route is the MAML layer's question (:mod:`fastmaml.maml.mlp_path`).

The fused kernel runs one task's K inner steps, query losses and adjoint inside one
workspace: per thread on the CPU (at most ``FUSED_CPU_MAX_WORKSPACE_BYTES``, 32 MiB: past
the L2, but one task's workspace is still streamed from the last-level cache, and for the
wide MLP of docs/DESIGN.md §5 — 12 MB at K = 5 — the fused kernel needs ~0.6x the CPU time
of the layer-wise path at second order, the same at first order; benchmarks/RESULTS.md,
"fastmaml/ops/maml_mlp_fit.py"; the layer-wise path holds all T tasks' K parameter copies
at once, so it is never the smaller one in memory), in one CTA's shared memory on CUDA (at most the
device's opt-in shared memory per block). At most ``codes.MLP_MAX_LAYERS`` layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastmaml import codes
from fastmaml._ext import cuda_emulated, ext

FUSED_CPU_MAX_WORKSPACE_BYTES = 32 << 20

codes.MLP_LR_SCALAR, codes.MLP_LR_TABLE, codes.MLP_LR_ELEMENT, codes.MLP_LR_STEP_ELEMENT = 0, 1, 2, 3

# ---- op-level fit checks ----------------------------------------------------------------------
def fused_workspace_bytes(dims: Sequence[int], steps: int, n_support: int, n_query: int, dtype=torch.float32, *,
                          lr_learned: bool = False, n_msl: int = 1) -> int:
    """Bytes of the per-task workspace of the fused kernel (CPU: per thread; CUDA: shared
    memory per CTA). ``lr_learned``: the K support gradients are kept for dα; ``n_msl``:
    the number of steps with a nonzero multi-step-loss weight (1 for plain MAML)."""
    L = len(dims) - 1
    P = sum(dims[l + 1] * dims[l] + dims[l + 1] for l in range(L))
    sd = sum(dims[1:])
    PT = P + sum(dims[l + 1] * dims[l] for l in range(L))  # with transposed weight copies
    n_g = steps if lr_learned else 1
    # = csrc/mlp/meta_step.h maml_workspace_size
    elems = (steps * PT + (n_g + n_msl) * P + steps * 3 * n_support * sd
             + max(3 * n_query * sd, 3 * n_support * sd + n_support * max(dims)) + 2 * PT + 2 * P)
    return elems * dtype.itemsize


def _cuda_smem_limit(device: torch.device) -> int:
    if device.type != "cuda":  # the emulated CUDA build (CPU tensors): its one (sm_90) device
        idx = 0
    else:
        idx = device.index if device.index is not None else torch.cuda.current_device()
    # the launcher adds a 16-element margin to the workspace: keep 256 bytes spare
    return int(ext().maml_mlp_cuda_smem_limit(idx)) - 256


def fused_limits(device: torch.device | str = "cpu", backend: str | None = None) -> dict:
    """The fused path's limits on ``device``: ``max_layers`` and ``max_workspace_bytes``
    (per task). ``backend="cuda"`` with CPU tensors: the emulated CUDA build's limits."""
    device = torch.device(device)
    if device.type == "cuda" or (device.type == "cpu" and backend == "cuda" and cuda_emulated()):
        return {"max_layers": codes.MLP_MAX_LAYERS, "max_workspace_bytes": _cuda_smem_limit(device)}
    return {"max_layers": codes.MLP_MAX_LAYERS, "max_workspace_bytes": FUSED_CPU_MAX_WORKSPACE_BYTES}


def fits_fused(dims: Sequence[int], steps: int, n_support: int, n_query: int, *, dtype=torch.float32,
               device: torch.device | str = "cpu", lr_learned: bool = False, n_msl: int = 1,
               backend: str | None = None) -> tuple[bool, str]:
    """Whether an MLP of widths ``dims`` fits the fused kernel; (ok, reason)."""
    L = len(dims) - 1
    lim = fused_limits(device, backend)
    if L < 1 or L > lim["max_layers"]:
        return False, f"{L} layers (the fused kernel takes 1..{lim['max_layers']})"
    need = fused_workspace_bytes(dims, steps, n_support, n_query, dtype, lr_learned=lr_learned, n_msl=n_msl)
    if need > lim["max_workspace_bytes"]:
        return False, (f"per-task workspace of {need} bytes exceeds the fused limit of "
                       f"{lim['max_workspace_bytes']} bytes on {torch.device(device).type}")
    return True, f"fits: per-task workspace {need} of {lim['max_workspace_bytes']} bytes"


_FITS_CACHE: dict = {}


def fits_cached(dims, K, Ns, Nq, dtype, device, lr_learned, n_msl, backend="cpu") -> bool:
    """:func:`fits_fused`'s answer, remembered per configuration (and the CPU limit)."""
    limit = FUSED_CPU_MAX_WORKSPACE_BYTES if (device.type == "cpu" and backend != "cuda") else None
    key = (tuple(dims), K, Ns, Nq, dtype, device, limit, lr_learned, n_msl, backend)
    ok = _FITS_CACHE.get(key)
    if ok is None:
        ok = fits_fused(dims, K, Ns, Nq, dtype=dtype, device=device, lr_learned=lr_learned, n_msl=n_msl,
                        backend=backend)[0]
        if len(_FITS_CACHE) >= 256:  # bounded: a meta-batch whose sizes change every step adds a key per step
            _FITS_CACHE.clear()
        _FITS_CACHE[key] = ok
    return ok


# ---- the factored path (fastmaml.ops._maml_mlp.factored) ------------------------------------------
FACTORED_MIN_PARAMS = 1 << 17  # 131,072 parameters: a task's copy of 512 KiB in float32


def prefers_factored(dims: Sequence[int], steps: int, n_support: int, lr_kind: str, backend: str,
                     device: torch.device | str = "cpu") -> tuple[bool, str]:
    """Whether ``maml_mlp`` runs its factored path (the inner steps as low-rank corrections of
    the shared weights); (yes, reason). On the CPU backend, for one rate or a per-step,
    per-tensor table (``lr_kind`` ``"float"``, ``"scalar"`` or ``"table"``; per-element rates
    make every update full-rank), an MLP of at least ``FACTORED_MIN_PARAMS`` parameters
    (below, one task's copies stay in the core's caches and the fused kernel is faster) whose
    rank ``r = steps·n_support`` is small: ``r·Σ_l (in_l + out_l) ≤ ¼·Σ_l in_l·out_l``, the
    per-task correction at most a quarter of the shared product. Measured on the benchmark's
    wide MLP (benchmarks/RESULTS.md, "the factored path"): 1.7–1.8x the fused kernel at
    r = 25, a loss past the rank bound (r = 125) and on the smaller nets."""
    if backend != "cpu" or torch.device(device).type != "cpu":
        return False, "the factored path runs on the CPU backend only"
    if lr_kind not in ("float", "scalar", "table"):
        return False, "per-element learning rates make every inner update full-rank"
    L = len(dims) - 1
    P = sum(dims[l] * dims[l + 1] + dims[l + 1] for l in range(L))
    if P < FACTORED_MIN_PARAMS:
        return False, f"{P} parameters (< {FACTORED_MIN_PARAMS}: the fused kernel keeps a task in cache)"
    r = steps * n_support
    corr = r * sum(dims[l] + dims[l + 1] for l in range(L))
    dense = sum(dims[l] * dims[l + 1] for l in range(L))
    if 4 * corr > dense:
        return False, f"rank steps·n_support = {r} too high for widths {list(dims)} ({corr} > {dense}/4 per row)"
    return True, f"factored inner steps: rank {r}, {corr} of {dense} multiply-adds per row per task"


__all__ = ["FUSED_CPU_MAX_WORKSPACE_BYTES", "FACTORED_MIN_PARAMS", "fused_workspace_bytes", "fused_limits",
           "fits_fused", "fits_cached", "prefers_factored"]
