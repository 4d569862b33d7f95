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
