"""Loads the compiled extension ``fastmaml._C`` once; remembers why it failed."""

from __future__ import annotations

from types import ModuleType

_C: ModuleType | None
try:
    from fastmaml import _C  # type: ignore[attr-defined, no-redef]

    IMPORT_ERROR = ""
except ImportError as exc:  # not built (e.g. running from a source tree without build_ext)
    _C = None
    IMPORT_ERROR = f"fastmaml._C is not built or failed to import: {exc}"


def ext() -> ModuleType:
    """The extension module, or a clear ``RuntimeError`` saying why it is missing."""
    if _C is None:
        raise RuntimeError(IMPORT_ERROR)
    return _C


def cuda_emulated() -> bool:
    """True in the ``FASTMAML_CUDA=emulate`` build: the ``cuda`` backend's kernels run on
    the CPU (csrc/common/cuda_emulation.h), on CPU tensors. Fixed when the extension was
    built; there is no switch at run time."""
    return _C is not None and bool(getattr(_C, "cuda_emulated", False))


class cuda_launch:  # noqa: N801 (a context manager used like a function)
    """``with cuda_launch(device) as (index, stream):`` around a call of a ``*_cuda``
    entry point of the extension. On a GPU, torch's current device is ``device`` for the
    call (so the launch, and any CUDA context it needs, is on that device, never on GPU 0
    of a fresh thread) and ``stream`` is its current stream's handle. In the emulated
    build the tensors are CPU tensors: (0, 0), nothing to switch."""

    __slots__ = ("device", "_ctx")

    def __init__(self, device) -> None:
        self.device = device
        self._ctx = None

    def __enter__(self) -> tuple[int, int]:
        import torch

        if self.device.type != "cuda":
            if cuda_emulated():
                return 0, 0
            raise ValueError(f"the cuda backend takes CUDA tensors, got tensors on {self.device}")
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        self._ctx = torch.cuda.device(index)
        self._ctx.__enter__()
        return index, torch.cuda.current_stream(index).cuda_stream

    def __exit__(self, *exc) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(*exc)
            self._ctx = None
