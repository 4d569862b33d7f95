"""Microbenchmark of ``fastmaml.ops.sgd_step`` (the fused inner update θ' = θ − α·g):
the op micro-suite ``python -m fastmaml.bench --suite sgd_step`` (``fastmaml.bench.op_sgd_step``),
where the methods, the parameter sets and the options are described.

    python benchmarks/bench_sgd_step.py [--backend cpu] [--reps 300] [--out PATH]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from fastmaml.bench.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["--suite", "sgd_step", *sys.argv[1:]]))
