#!/usr/bin/env bash
# One command for the first machine with a GPU: builds gsplat's kernels for that GPU, checks the real
# training path against the CPU kernels, times it against gsplat, writes benchmarks/results/gpu_check/.
# Needs torch (with CUDA) and nvcc; gsplat installed or carried (.venv/lib/python3.11/site-packages/gsplat),
# ninja on PATH or carried (.venv/bin/ninja). No GPU: one line, exit 0. Options: benchmarks/gpu_check.py -h
#   bash scripts/gpu_check.sh [--quick] [--out DIR] [--gsplat-src PATH]
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    # The checkout's venv where it is whole; on a GPU machine only parts of .venv may be carried.
    for candidate in .venv/bin/python python3 python; do
        if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import torch" >/dev/null 2>&1; then
            PY="$candidate"
            break
        fi
    done
fi
if [ -z "$PY" ]; then
    echo "gpu_check: no Python with torch found (tried .venv/bin/python, python3, python); set PYTHON=/path/to/python"
    exit 1
fi
exec "$PY" benchmarks/gpu_check.py "$@"
