"""fastmaml.batch_norm against PyTorch's F.batch_norm (batch statistics, training mode):
median time of the forward, of forward+backward, and of the Hessian-vector product a
MAML meta-gradient takes through one BN layer (forward, backward with create_graph,
then the double backward w.r.t. x, the weight and the incoming gradient), on the BN inputs of the benchmark networks' first layers.

    python benchmarks/bench_batch_norm.py [--reps 20] [--threads N] [--dtype float32]

Prints a Markdown table; nothing is written.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fastmaml.ops import _batch_norm as bn  # noqa: E402

# (label, shape of the first BN layer's input)
SHAPES = [
    ("miniImageNet support, 25 x 32 x 84 x 84", (25, 32, 84, 84)),
    ("miniImageNet query, 75 x 32 x 84 x 84", (75, 32, 84, 84)),
    ("Omniglot support, 5 x 64 x 14 x 14", (5, 64, 14, 14)),
]


def _native(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5)


def _fused(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return bn.batch_norm(x, w, b, 1e-5)


def _median_ms(f, reps: int) -> float:
    f()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if not bn.available():
        print("fastmaml._C is not built: the fused kernels are unavailable", file=sys.stderr)
        return 1
    dtype = getattr(torch, a.dtype)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {a.dtype}, median of {a.reps}\n")
    print("| BN input | stage | PyTorch | fastmaml | speedup |")
    print("| --- | --- | --- | --- | --- |")
    for label, shape in SHAPES:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=g, dtype=dtype).requires_grad_(True)
        w = (1 + 0.1 * torch.randn(shape[1], generator=g, dtype=dtype)).requires_grad_(True)
        b = (0.1 * torch.randn(shape[1], generator=g, dtype=dtype)).requires_grad_(True)
        gy = torch.randn(shape, generator=g, dtype=dtype)
        u = [torch.randn_like(t) for t in (x, w, b)]

        def forward(f):
            def run():
                with torch.no_grad():
                    f(x, w, b)
            return run

        def fwd_bwd(f):
            return lambda: torch.autograd.grad(f(x, w, b), (x, w, b), gy)

        gy_leaf = gy.clone().requires_grad_(True)  # in a MAML HVP the incoming gradient depends on θ too

        def hvp(f):
            def run():
                gs = torch.autograd.grad(f(x, w, b), (x, w, b), gy_leaf, create_graph=True)
                torch.autograd.grad(gs, (x, w, gy_leaf), u)
            return run

        for stage, make in (("forward", forward), ("forward + backward", fwd_bwd), ("HVP (to 2nd order)", hvp)):
            tn = _median_ms(make(_native), a.reps)
            tf = _median_ms(make(_fused), a.reps)
            print(f"| {label} | {stage} | {tn:.2f} ms | {tf:.2f} ms | {tn / tf:.2f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
