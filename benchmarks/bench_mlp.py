"""Fused MLP benchmark: the sinusoid configuration (MLP 1-40-40-1,
T = 25 and 1000, K = 1 and 5, second and first order) and the wide MLP
(784-256-128-64-64-5, Omniglot's non-convolutional MAML network, 5-way 1-shot, T=32,
K = 1 and 5): fastmaml's fused path (the path fastmaml.MAML picks for an MLP) against its
generic path, torch.func vmap (eager), torch.compile of torch.func.grad of the vmapped
meta-loss (plus mode="reduce-overhead" on a GPU), JAX jit and the per-task loop. Reports
median time, tasks/s and achieved GFLOP/s against the matmul FLOP count of the meta-step
(fastmaml.bench.flops: per task K·G(Ns) + G(Nq), plus K·H(Ns) for the K Hessian-vector
products of second order, G = 6NP − 2NP₁ a loss and gradient, H = 12NP − 8NP₁ an HVP;
P = the weight count, P₁ the first layer's), and the
micro ops (mlp_loss_and_grad, mlp_hvp, sgd_step).

    python benchmarks/bench_mlp.py [more options of python -m fastmaml.bench]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from fastmaml.bench.__main__ import main  # noqa: E402

ARGS = ["--full", "--suite", "micro,sinusoid,wide-mlp", "--order", "both",
        "--peers", "fastmaml,fastmaml-generic,vmap,compile,compile-ro,jax,loop", "--out", "bench_out/mlp"]

if __name__ == "__main__":
    sys.exit(main(ARGS + sys.argv[1:]))
