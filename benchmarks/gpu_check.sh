#!/usr/bin/env bash
# One-shot GPU check (benchmarks/gpu_check.py): paper-scale training, HEMNMA and inference
# throughput on one GPU, printed as one table, in under 8 minutes. Run from the repository root
# on the GPU machine after installing (python3 -m venv .venv && .venv/bin/pip install -e .):
#   bash benchmarks/gpu_check.sh [--work DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 470 "$PY" benchmarks/gpu_check.py --device cuda "$@"
