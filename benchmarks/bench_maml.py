"""MAML core benchmark: the configurations of docs/DESIGN.md §5 (sinusoid,
Omniglot K=1 and 5, miniImageNet K=5), second and first order: fastmaml (for the conv
nets its generic path; for the sinusoid MLP both the path it picks and its generic path)
against the per-task loop with autograd.grad(create_graph=True) (learn2learn's
algorithm), higher.innerloop_ctx and torch.func vmap in eager mode. Reports the median
time per meta-step, peak memory, and each meta-gradient's max difference from the
float64 reference.

    python benchmarks/bench_maml.py [more options of python -m fastmaml.bench]

e.g. ``--device cuda``, ``--reps 3`` (interleaved rounds), ``--results-md benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from fastmaml.bench.__main__ import main  # noqa: E402

ARGS = ["--full", "--suite", "sinusoid,omniglot,miniimagenet", "--order", "both",
        "--peers", "fastmaml,fastmaml-generic,loop,higher,vmap", "--out", "bench_out/maml"]

if __name__ == "__main__":
    sys.exit(main(ARGS + sys.argv[1:]))
