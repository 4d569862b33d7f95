"""Soak test: memory stays flat over many meta-steps.

Runs meta-training steps (meta-loss, backward, Adam) of

* the sinusoid MLP (1-40-40-1 ReLU, 25 tasks, 10+10 points, K=5; the fused MLP path):
  10,000 meta-steps at full size;
* the Omniglot conv net (4 x [conv 3x3 64, BatchNorm, ReLU, stride 2] + linear, 5-way
  1-shot, 32 tasks, 5+75 images of 28x28, K=5, second order; the generic path): 500
  meta-steps at full size;

each once with a fixed meta-batch shape and once with a meta-batch whose shapes (tasks,
support and query points, up to the fixed run's) change every step, which exercises the
bounded route caches (the first step has the largest shape, so the warm-up sees the
peak and later growth is a leak, not a larger batch).
The resident set size (RSS, /proc/self/statm) is sampled after ``gc.collect()`` and
``malloc_trim(0)`` (glibc keeps freed memory of worker threads' arenas otherwise, MiB on
its own) 20 times after the warm-up (the first 20 % of the steps; with varying shapes the
first half). The growth is the median of the last third of the samples less the median
of the first third, and must stay under ``--limit-mib`` (5 MiB); exit status 1 otherwise.
A leak shows as a trend; the single samples of the conv net scatter by ±15 MiB around a
flat level at full size (its task workers' arenas fragment differently from step to
step), which a comparison with the largest sample would report as growth (the peak is
printed too, and every sample).

    python benchmarks/soak.py            # full size (about half an hour on a 2-core CPU)
    python benchmarks/soak.py --small    # the CI size (a minute or two)
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import random
import statistics
import sys
import time

# oneDNN (PyTorch's CPU convolutions) caches a compiled primitive per convolution shape,
# up to 1024 of them: with a meta-batch whose shapes change every step that cache alone
# grows by MiB (measured: 13.6 of the 18.6 MiB growth over 40 steps of the small conv
# soak). It is PyTorch's, bounded, and not what this test looks for, so it is kept small
# here (set before torch is imported).
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import fastmaml  # noqa: E402

_PAGE = os.sysconf("SC_PAGE_SIZE")
try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc: sample without trimming
    _LIBC = None


def rss_mib() -> float:
    """RSS after a collection and ``malloc_trim(0)``, in MiB."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE / 2**20


def _route_cache():
    """The router's per-model cache of routes (bounded: it is cleared past its size)."""
    from fastmaml.maml import dispatch

    return getattr(dispatch, "_CACHE", {})


def sinusoid_model() -> nn.Module:
    return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))


def omniglot_model(hidden: int) -> nn.Module:
    layers: list[nn.Module] = []
    c = 1
    for _ in range(4):  # 28 -> 14 -> 7 -> 4 -> 2
        layers += [nn.Conv2d(c, hidden, 3, stride=2, padding=1), nn.BatchNorm2d(hidden, track_running_stats=False),
                   nn.ReLU()]
        c = hidden
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(hidden * 4, 5))


def sinusoid_batch(g: torch.Generator, T: int, Ns: int, Nq: int) -> list[torch.Tensor]:
    amp = 0.1 + 4.9 * torch.rand(T, 1, 1, generator=g)
    phase = torch.pi * torch.rand(T, 1, 1, generator=g)
    xs = -5 + 10 * torch.rand(T, Ns, 1, generator=g)
    xq = -5 + 10 * torch.rand(T, Nq, 1, generator=g)
    return [xs, amp * torch.sin(xs - phase), xq, amp * torch.sin(xq - phase)]


def omniglot_batch(g: torch.Generator, T: int, Ns: int, Nq: int) -> list[torch.Tensor]:
    return [torch.randn(T, Ns, 1, 28, 28, generator=g), torch.randint(0, 5, (T, Ns), generator=g),
            torch.randn(T, Nq, 1, 28, 28, generator=g), torch.randint(0, 5, (T, Nq), generator=g)]


def soak(name: str, maml: fastmaml.MAML, batch, steps: int, shape, vary: bool, limit: float, seed: int = 0) -> bool:
    """Run ``steps`` meta-steps; print the RSS figures; True when the growth is < limit."""
    opt = torch.optim.Adam(maml.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    rnd = random.Random(seed)
    T, Ns, Nq = shape
    warm = max(1, steps // (2 if vary else 5))  # varying shapes: half the run to see their range
    n_samples = 20
    every = max(1, (steps - warm) // n_samples)
    base = None
    samples: list[float] = []
    t0 = time.perf_counter()
    for step in range(steps):
        if vary and step > 0:  # the largest meta-batch first: the warm-up sees the peak
            shp = (rnd.randint(1, T), rnd.randint(1, Ns), rnd.randint(1, Nq))
        else:
            shp = shape
        data = batch(g, *shp)
        opt.zero_grad(set_to_none=True)
        loss = maml(*data)
        loss.backward()
        opt.step()
        del loss, data
        if step + 1 == warm:
            base = rss_mib()
        elif base is not None and (step + 1 - warm) % every == 0:
            samples.append(rss_mib())
    wall = time.perf_counter() - t0
    assert base is not None
    last = samples[-1] if samples else base
    third = max(1, len(samples) // 3)
    growth = statistics.median(samples[-third:]) - statistics.median(samples[:third]) if samples else 0.0
    peak = max(samples, default=base) - base
    caches = len(_route_cache().get(maml.model, {}))
    ok = growth < limit
    print(f"{name:<34} {'varying' if vary else 'fixed':<7} steps {steps:>6}  {wall:7.1f} s  path {maml.path:<13} "
          f"RSS after warm-up {base:7.1f} MiB, last {last:7.1f} MiB, peak {peak:+6.2f} MiB, growth {growth:+6.2f} MiB "
          f"(median of the last third of the samples less the first third's; limit {limit} MiB), {caches} cached "
          f"routes {'ok' if ok else 'FAIL'}", flush=True)
    print(f"{'':<34} RSS samples after warm-up (MiB, every {every} steps): "
          + " ".join(f"{s:.1f}" for s in samples), flush=True)
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="the CI size: fewer steps, a smaller conv net")
    ap.add_argument("--limit-mib", type=float, default=5.0)
    ap.add_argument("--only", choices=["sinusoid", "omniglot"], default=None)
    ap.add_argument("--shapes", choices=["both", "fixed", "varying"], default="both",
                    help="the fixed-shape run, the varying-shape run or both (default)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    if args.small:
        sin_steps, omni_steps, hidden, omni_shape, omni_K = 1000, 30, 16, (4, 5, 15), 2
    else:
        sin_steps, omni_steps, hidden, omni_shape, omni_K = 10_000, 500, 64, (32, 5, 75), 5
    print(f"soak ({'small' if args.small else 'full'} size), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)
    ok = True
    varies = {"both": (False, True), "fixed": (False,), "varying": (True,)}[args.shapes]
    if args.only in (None, "sinusoid"):
        for vary in varies:
            m = fastmaml.MAML(sinusoid_model(), inner_lr=0.01, inner_steps=5)
            ok &= soak("sinusoid MLP 1-40-40-1, K=5", m, sinusoid_batch, sin_steps, (25, 10, 10), vary,
                       args.limit_mib)
    if args.only in (None, "omniglot"):
        for vary in varies:
            m = fastmaml.MAML(omniglot_model(hidden), inner_lr=0.4, inner_steps=omni_K, loss="cross_entropy")
            ok &= soak(f"Omniglot conv{hidden}x4, K={omni_K}, 2nd order", m, omniglot_batch,
                       omni_steps, omni_shape, vary, args.limit_mib)
    print("soak: " + ("ok" if ok else "FAILED: memory grew"), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
