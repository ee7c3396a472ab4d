#!/usr/bin/env bash
# GPU readiness check (see scripts/gpu_check.py). Exits 0 with a message on machines without CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
exec "$PY" scripts/gpu_check.py "$@"
