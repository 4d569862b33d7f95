"""Input validation shared by every op. Each check names the argument, the expected
and the actual value, and raises ``TypeError`` (wrong kind of object or dtype) or
``ValueError`` (wrong shape, device, layout, value). Nothing reaches a kernel before
these have passed."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float64)


def tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def tensor_list(name: str, ts: object, *, min_len: int = 1) -> list[torch.Tensor]:
    if isinstance(ts, torch.Tensor) or not isinstance(ts, Sequence):
        raise TypeError(f"{name} must be a list or tuple of tensors, got {type(ts).__name__}")
    out = [tensor(f"{name}[{i}]", t) for i, t in enumerate(ts)]
    if len(out) < min_len:
        raise ValueError(f"{name} must hold at least {min_len} tensor(s), got {len(out)}")
    return out


def float_dtype(name: str, t: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype} like the other inputs, got {t.dtype}")


def same_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} must be on {device} like the other inputs, got {t.device} "
                         f"(device mismatch: expected device {device}, got device {t.device})")


def contiguous(name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {tuple(t.stride())} for shape {tuple(t.shape)}")


def shape(name: str, t: torch.Tensor, expected: Sequence[int]) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(t.shape)}")


def finite(name: str, t: torch.Tensor) -> None:
    if torch.compiler.is_compiling():  # the check stays on in a compiled graph: an in-graph assert (RuntimeError)
        torch._assert_async(torch.isfinite(t).all(), f"{name} contains NaN or Inf")
        return
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def span(t: torch.Tensor) -> tuple[int, int]:
    """Byte range [lo, hi) that tensor ``t`` can touch in its storage."""
    if t.numel() == 0:
        return (0, 0)
    lo = t.data_ptr()
    extent = 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()))
    return lo, lo + extent * t.element_size()


def lr_tensor(name: str, a: torch.Tensor, dtype: torch.dtype, device: torch.device, strict: bool = True) -> None:
    """A tensor learning rate: floating point of the call's ``dtype`` on its ``device``;
    contiguous unless ``strict`` is False (inside torch.func transforms)."""
    if not a.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor of dtype {dtype}, got {a.dtype}")
    float_dtype(name, a, dtype)
    same_device(name, a, device)
    if strict:
        contiguous(name, a)


# Above this an inner learning rate is almost surely a mistake: one SGD step of a loss
# with curvature of order 1 already diverges past lr = 2.
HUGE_LR = 1e3


def inner_lr(name: str, v: object) -> float:
    """A fixed inner learning rate: a finite float > 0 (0 would not adapt at all, a
    negative rate ascends the support loss); a warning above ``HUGE_LR``."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite float > 0, got {v!r} (0 would not adapt; a negative rate ascends "
                         "the support loss)")
    if v > HUGE_LR:
        warnings.warn(f"{name}={v!r} is very large (> {HUGE_LR:g}): the inner SGD steps will most likely diverge "
                      "and the meta-loss become Inf or NaN", UserWarning, stacklevel=3)
    return v


def positive_int(name: str, v: object, *, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def no_overlap_among(named: Sequence[tuple[str, torch.Tensor]]) -> None:
    """Raise ``ValueError`` naming a pair when any two of the tensors share memory.

    Sorts the byte spans once and sweeps them (O(n log n) instead of all pairs). The
    same tensor object listed twice under one name (e.g. one 0-d lr shared by every
    tensor) should be passed once."""
    spans = []
    for name, t in named:
        if t.numel() == 0:
            continue
        lo, hi = span(t)
        spans.append((t.device, lo, hi, name))
    spans.sort(key=lambda s: (str(s[0]), s[1]))
    for k in range(1, len(spans)):
        dev, lo, _, name = spans[k]
        pdev, _, phi, pname = spans[k - 1]
        if dev == pdev and lo < phi:
            raise ValueError(f"{pname} and {name} overlap in memory; pass separate tensors (e.g. {name}.clone())")
        if dev == pdev and phi > spans[k][2]:  # keep the furthest end in the previous slot
            spans[k] = (dev, lo, phi, pname)
