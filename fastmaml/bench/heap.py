"""glibc malloc settings for the method processes (``--malloc``).

glibc's malloc maps every allocation above its mmap threshold fresh from the kernel and
unmaps it on free. The threshold is dynamic but at most 32 MiB, so a tensor past it — a
miniImageNet query set's conv activations are 68 MB — page-faults all its pages in again
on every call: in one measurement (benchmarks/RESULTS.md, "The heap setting of the method
processes") the same first-order miniImageNet step took 0.94 to 1.23 s in fresh processes
with glibc's defaults and 0.71 to 0.74 s with the settings below, which keep freed memory
in the heap for reuse (and return it to the system only past 512 MiB of free top).

``--malloc tuned`` (the default with per-method processes) gives every method's process,
fastmaml's and every peer's alike, :data:`TUNED`; a variable the user set already is kept.
``--malloc inherit`` leaves the environment as it is. glibc reads the settings when a
process starts, so in-process runs (``--method-timeout 0``) always inherit. Outside the
benchmark the same variables tune any PyTorch CPU program (docs/DESIGN.md §5).
"""

from __future__ import annotations

import os

TUNED = {"MALLOC_MMAP_THRESHOLD_": "268435456", "MALLOC_TRIM_THRESHOLD_": "536870912"}
CHOICES = ("tuned", "inherit")


def user_settings() -> dict[str, str]:
    """The MALLOC_* variables of this process's environment (the user's)."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")}


def apply(choice: str, per_process: bool) -> tuple[str, list[str]]:
    """Set the environment the method processes inherit; returns the report's line and
    the variables set (for :func:`restore`)."""
    if choice not in CHOICES:
        raise SystemExit(f"--malloc must be one of {CHOICES}, got {choice!r}")
    if choice == "inherit" or not per_process:
        user = user_settings()
        what = ", ".join(f"{k}={v}" for k, v in user.items()) or "glibc's defaults"
        why = "--malloc inherit" if choice == "inherit" else "in-process run: --malloc applies to method processes only"
        return f"malloc: inherited ({what}; {why})", []
    added = [k for k in TUNED if k not in os.environ]
    for k in added:
        os.environ[k] = TUNED[k]
    now = ", ".join(f"{k}={os.environ[k]}" for k in TUNED)
    return (f"malloc: every method's process (fastmaml's and each peer's) runs with {now} (--malloc tuned, the "
            "default: large tensors reuse freed heap instead of page-faulting fresh mappings on every call)"), added


def restore(added: list[str]) -> None:
    """Remove the variables :func:`apply` set (this process's own malloc never read them)."""
    for k in added:
        os.environ.pop(k, None)


__all__ = ["TUNED", "CHOICES", "user_settings", "apply", "restore"]
