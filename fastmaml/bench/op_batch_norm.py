"""Micro-suite ``batch_norm``: fastmaml's fused BatchNorm against PyTorch's F.batch_norm
(batch statistics, training mode): median time of the forward, of forward+backward, and
of the Hessian-vector product a MAML meta-gradient takes through one BN layer (forward,
backward with create_graph, then the double backward w.r.t. x, the weight and the
incoming gradient), on the BN inputs of the benchmark networks' first layers.

    python -m fastmaml.bench --suite batch_norm [--reps 20] [--threads N] [--dtype float32]

Prints a Markdown table; ``--out PATH`` also writes JSON (machine, versions, figures).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

from fastmaml.ops import _batch_norm as bn
from fastmaml.bench import measure, report

# (label, shape of the first BN layer's input)
SHAPES = [
    ("miniImageNet support, 25 x 32 x 84 x 84", (25, 32, 84, 84)),
    ("miniImageNet query, 75 x 32 x 84 x 84", (75, 32, 84, 84)),
    ("Omniglot support, 5 x 64 x 14 x 14", (5, 64, 14, 14)),
]
STAGES = ("forward", "forward + backward", "HVP (to 2nd order)")


def _native(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5)


def _fused(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return bn.batch_norm(x, w, b, 1e-5)


def stage_calls(f: Callable, shape: tuple[int, ...], dtype: torch.dtype) -> dict[str, Callable[[], object]]:
    """The three timed calls of one BN implementation ``f(x, w, b)`` on inputs of ``shape``
    (all drawn from one seed: both implementations get the same values)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=dtype).requires_grad_(True)
    w = (1 + 0.1 * torch.randn(shape[1], generator=g, dtype=dtype)).requires_grad_(True)
    b = (0.1 * torch.randn(shape[1], generator=g, dtype=dtype)).requires_grad_(True)
    gy = torch.randn(shape, generator=g, dtype=dtype)
    u = [torch.randn(t.shape, generator=g, dtype=dtype) for t in (x, w, b)]
    gy_leaf = gy.clone().requires_grad_(True)  # in a MAML HVP the incoming gradient depends on θ too

    def forward():
        with torch.no_grad():
            return f(x, w, b)

    def hvp():
        gs = torch.autograd.grad(f(x, w, b), (x, w, b), gy_leaf, create_graph=True)
        return torch.autograd.grad(gs, (x, w, gy_leaf), u)

    return {STAGES[0]: forward, STAGES[1]: lambda: torch.autograd.grad(f(x, w, b), (x, w, b), gy), STAGES[2]: hvp}


def run(shapes: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype, reps: int) -> list[dict]:
    cpu = torch.device("cpu")
    rows = []
    for label, shape in shapes:
        native, fused = stage_calls(_native, shape, dtype), stage_calls(_fused, shape, dtype)
        for stage in STAGES:
            tn = statistics.median(measure.repeat(native[stage], reps, 1, cpu)) * 1e3
            tf = statistics.median(measure.repeat(fused[stage], reps, 1, cpu)) * 1e3
            rows.append(dict(input=label, shape=list(shape), stage=stage, pytorch_ms=tn, fastmaml_ms=tf,
                             speedup=tn / tf))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastmaml.bench --suite batch_norm",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--out", default=None, help="also write JSON here")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if not bn.available():
        print("fastmaml._C is not built: the fused kernels are unavailable", file=sys.stderr)
        return 1
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {a.dtype}, median of {a.reps}\n")
    print("| BN input | stage | PyTorch | fastmaml | speedup |")
    print("| --- | --- | --- | --- | --- |")
    rows = run(SHAPES, getattr(torch, a.dtype), a.reps)
    for r in rows:
        print(f"| {r['input']} | {r['stage']} | {r['pytorch_ms']:.2f} ms | {r['fastmaml_ms']:.2f} ms | "
              f"{r['speedup']:.2f}× |")
    if a.out:
        report.write_payload(a.out, {"benchmark": "batch_norm", "dtype": a.dtype, "reps": a.reps,
                                     "meta": report.machine_info(torch.device("cpu")), "rows": rows})
        print(f"\nwrote {a.out}")
    return 0
