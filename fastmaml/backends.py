"""The backend registry: ``reference``, ``cpu``, ``cuda`` and ``triton``.

Selection order for an op (docs/DESIGN.md §3): the explicit ``backend=`` argument, else
the ``FASTMAML_BACKEND`` environment variable, else automatic: for CUDA tensors the first
available of ``GPU_PREFERENCE`` (the GPU backends in order of measured speed,
benchmarks/RESULTS.md), for CPU tensors ``cpu`` when the extension is built, else
``reference``.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from fastmaml import _ext

BACKENDS = ("reference", "cpu", "cuda", "triton")

# The GPU backends in order of measured speed (benchmarks/RESULTS.md), the same for every op.
GPU_PREFERENCE = ("cuda", "triton", "reference")


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str  # why not available ('' when available)
    devices: str  # which tensors it accepts


@functools.lru_cache(maxsize=None)
def _triton_status() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return False, f"triton does not import: {exc}"
    if torch.cuda.is_available():
        return True, ""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True, ""
    return False, "no CUDA device (set TRITON_INTERPRET=1 to run Triton kernels on CPU tensors, slowly)"


@functools.lru_cache(maxsize=None)
def _cuda_status() -> tuple[bool, str]:
    if _ext._C is None:
        return False, _ext.IMPORT_ERROR
    if not _ext._C.cuda_compiled:
        return False, f"fastmaml._C was built without CUDA ({_ext._C.cuda_reason})"
    n, err = _ext._C.cuda_device_count()
    if n == 0:
        return False, f"no CUDA device visible to the CUDA runtime ({err or 'count is 0'})"
    if not torch.cuda.is_available():
        return False, "torch has no CUDA support (CPU build of PyTorch)"
    return True, ""


def status(name: str) -> BackendStatus:
    """Availability of one backend, with the reason when it is unavailable."""
    if name == "reference":
        return BackendStatus(name, True, "", "cpu, cuda")
    if name == "cpu":
        ok = _ext._C is not None
        return BackendStatus(name, ok, "" if ok else _ext.IMPORT_ERROR, "cpu")
    if name == "cuda":
        ok, why = _cuda_status()
        return BackendStatus(name, ok, why, "cuda")
    if name == "triton":
        ok, why = _triton_status()
        return BackendStatus(name, ok, why, "cuda (cpu under TRITON_INTERPRET=1)")
    raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")


def available() -> list[str]:
    return [b for b in BACKENDS if status(b).available]


def _accepts(name: str, device: torch.device) -> bool:
    if name == "reference":
        return True
    if name == "cpu":
        return device.type == "cpu"
    if name == "cuda":
        return device.type == "cuda"
    if name == "triton":
        return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1")
    return False


def resolve(backend: str | None, device: torch.device, op: str) -> str:
    """Pick the backend that runs ``op`` on tensors living on ``device``.

    An explicitly requested backend that is unavailable, or that cannot take tensors on
    ``device``, raises ``ValueError``/``RuntimeError`` naming the reason; it is never
    silently replaced by another one.
    """
    requested = backend if backend is not None else os.environ.get("FASTMAML_BACKEND") or None
    if (requested is None or requested == "cpu" or requested == "auto") and _ext._C is not None and device.type == "cpu":
        return "cpu"  # what the checks below conclude, without building BackendStatus objects (small ops' hot path)
    if requested is not None and requested != "auto":
        if requested not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or 'auto', got {requested!r}")
        st = status(requested)
        if not st.available:
            raise RuntimeError(f"{op}: backend {requested!r} is not available: {st.reason}")
        if not _accepts(requested, device):
            raise ValueError(f"{op}: backend {requested!r} cannot run on {device.type} tensors (it takes {st.devices})")
        return requested
    if device.type == "cuda":
        for name in GPU_PREFERENCE:
            if status(name).available:
                return name
        return "reference"
    if device.type == "cpu" and status("cpu").available:
        return "cpu"
    return "reference"
