"""Microbenchmark of the Triton MLP kernels on a GPU: the op micro-suite
``python -m fastmaml.bench --suite mlp_triton`` (``fastmaml.bench.op_mlp_triton``, where the
configurations and the FLOP count are written down).

    python benchmarks/bench_mlp_triton.py [--reps 100] [--dtype float32] [--out PATH]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from fastmaml.bench.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["--suite", "mlp_triton", *sys.argv[1:]]))
