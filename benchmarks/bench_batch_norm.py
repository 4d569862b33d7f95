"""fastmaml's fused BatchNorm against PyTorch's F.batch_norm (forward, forward+backward,
the HVP of a MAML meta-gradient): the op micro-suite ``python -m fastmaml.bench --suite
batch_norm`` (``fastmaml.bench.op_batch_norm``).

    python benchmarks/bench_batch_norm.py [--reps 20] [--threads N] [--dtype float32]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from fastmaml.bench.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["--suite", "batch_norm", *sys.argv[1:]]))
