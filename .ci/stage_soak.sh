#!/usr/bin/env bash
# CI stage: the soak test at its small size (benchmarks/soak.py --small): memory must stay
# flat (RSS growth after warm-up < 5 MiB, sampled after malloc_trim) over many meta-steps
# of the sinusoid MLP and the Omniglot-shaped conv net, with fixed and with changing
# meta-batch shapes. Uses the fastmaml installed in the CI environment (the editable
# install's build; set PYTHONPATH to a tree built in place to use that one instead).
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$SECONDS
python benchmarks/soak.py --small "$@"
echo "soak: $((SECONDS - t0)) s"
