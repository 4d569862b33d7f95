"""Micro-suite ``mlp_triton``: the Triton MLP kernels (``fastmaml.triton.mlp``) on a GPU.

Per-task batched loss + gradient and Hessian-vector product of an MLP, against the
reference twins (``fastmaml.reference.mlp``: batched ``bmm`` forward, autograd backward,
double backward for the HVP) on the same tensors. Configurations (docs/DESIGN.md §5):

- ``sinusoid``: 1-40-40-1 ReLU, MSE, N = 10, T = 25 and T = 1000;
- ``omniglot-mlp``: 784-256-128-64-64-5 ReLU, cross-entropy, 5-way 1-shot support
  (N = 5) and query (N = 75), T = 32.

FLOP count (used for GFLOP/s): one "product" of layer l is ``2·T·N·in_l·out_l`` flops.
Gradient: forward 1, dW 1, δ_{l−1} 1 (not for l = 1) → ``3L − 1`` products. HVP
(R-operator): forward z 1 + R{z} 2 (1 for l = 1), backward R{dW} 2 (1 for l = 1),
δ_{l−1} 1 + R{δ_{l−1}} 2 (not for l = 1) → 8 per layer, 3 for the first. Elementwise
work is not counted.

    python -m fastmaml.bench --suite mlp_triton [--reps 100] [--dtype float32] [--out PATH]

Prints a table and writes JSON (machine, versions, commit, figures) to ``--out``
(default ``bench_out/mlp_triton_cuda.json``). Needs a CUDA GPU (the Triton interpreter
is for tests only).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fastmaml.bench import measure, report
from fastmaml.reference import mlp as ref

CONFIGS = [
    # name, dims, N, T, loss
    ("sinusoid T=25", [1, 40, 40, 1], 10, 25, "mse"),
    ("sinusoid T=1000", [1, 40, 40, 1], 10, 1000, "mse"),
    ("omniglot-mlp support", [784, 256, 128, 64, 64, 5], 5, 32, "cross_entropy"),
    ("omniglot-mlp query", [784, 256, 128, 64, 64, 5], 75, 32, "cross_entropy"),
]


def flops(dims: list[int], N: int, T: int) -> tuple[int, int]:
    """(gradient flops, HVP flops) per call, as in the module docstring."""
    prods = [2 * T * N * i * o for i, o in zip(dims[:-1], dims[1:])]
    grad = sum(p * (2 if l == 0 else 3) for l, p in enumerate(prods))
    hvp = sum(p * (3 if l == 0 else 8) for l, p in enumerate(prods))
    return grad, hvp


def cases(tmlp, dims: list[int], N: int, T: int, loss: str, dev: torch.device,
          dt: torch.dtype) -> dict[str, tuple[Callable[[], object], int]]:
    """The four timed calls of one configuration (``tmlp``: the Triton module) and their flops."""
    g = torch.Generator().manual_seed(0)
    ws = [(torch.randn(T, o, i, generator=g) / i**0.5).to(dev, dt) for i, o in zip(dims[:-1], dims[1:])]
    bs = [torch.zeros(T, o, device=dev, dtype=dt) for o in dims[1:]]
    vws, vbs = [torch.randn_like(w) for w in ws], [torch.randn_like(b) for b in bs]
    x = torch.randn(T, N, dims[0], generator=g).to(dev, dt)
    y = (torch.randn(T, N, dims[-1], generator=g).to(dev, dt) if loss == "mse"
         else torch.randint(0, dims[-1], (T, N), generator=g).to(dev))
    fg, fh = flops(dims, N, T)
    return {
        "grad triton": (lambda: tmlp.mlp_loss_and_grad(ws, bs, x, y, loss=loss), fg),
        "grad reference": (lambda: ref.mlp_loss_and_grad(ws, bs, x, y, loss=loss), fg),
        "hvp triton": (lambda: tmlp.mlp_hvp(ws, bs, x, y, vws, vbs, loss=loss), fh),
        "hvp reference": (lambda: ref.mlp_hvp(ws, bs, x, y, vws, vbs, loss=loss), fh),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastmaml.bench --suite mlp_triton",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("mlp_triton: needs a CUDA GPU (the interpreter is for tests only)", file=sys.stderr)
        return 2
    import triton  # noqa: PLC0415 (after the device check)

    from fastmaml.triton import mlp as tmlp  # noqa: PLC0415

    dev, dt = torch.device("cuda"), getattr(torch, args.dtype)
    rows = []
    for name, dims, N, T, loss in CONFIGS:
        for what, (fn, fl) in cases(tmlp, dims, N, T, loss, dev, dt).items():
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            first = time.perf_counter() - t0  # includes Triton's JIT compile on the first call
            med = statistics.median(measure.repeat(fn, args.reps, 10, dev))
            rows.append(dict(config=name, case=what, median_ms=med * 1e3, first_call_ms=first * 1e3,
                             gflops=fl / med / 1e9, flops=fl, T=T, N=N, dims=dims, loss=loss))
            r = rows[-1]
            print(f"{name:22s} {what:15s} {r['median_ms']:8.3f} ms  {r['gflops']:8.2f} GFLOP/s  "
                  f"first {r['first_call_ms']:8.1f} ms")
    meta = report.machine_info(dev)
    meta.update(triton=triton.__version__, dtype=args.dtype, reps=args.reps)
    out = args.out or Path("bench_out/mlp_triton_cuda.json")
    report.write_payload(out, dict(meta=meta, rows=rows))
    print(f"wrote {out}")
    return 0
