"""Memory against inner steps: the miniImageNet configuration
(T=2, 5-way 5-shot, 84x84x3, 4-conv with BatchNorm), second order, K = 1, 5, 10, 20:
the peak memory growth of one meta-step of fastmaml's adjoint (K HVPs, no stored graph
of the inner loop) against unrolled autograd (the per-task loop, and torch.func vmap
over all tasks). On a CPU, peak memory is the RSS high-water growth; on a GPU,
torch.cuda.max_memory_allocated. Writes the table, the JSON and the memory-vs-K plot.

    python benchmarks/bench_memory.py [--steps 1,5,10,20] [--peers fastmaml,loop] [...]

The vmap peer needs about 12 GB at K=20 on a CPU; leave it out with
``--peers fastmaml,loop`` on a smaller machine.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from fastmaml.bench.__main__ import main  # noqa: E402

ARGS = ["--full", "--suite", "memory-K", "--out", "bench_out/memory"]

if __name__ == "__main__":
    sys.exit(main(ARGS + sys.argv[1:]))
