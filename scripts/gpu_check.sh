#!/usr/bin/env bash
# The GPU kernels proven in one call (issues 19, 24): see scripts/gpu_check.py and docs/testing.md.
#   bash scripts/gpu_check.sh             on the device machine (writes to $OUT; under 6 minutes)
#   bash scripts/gpu_check.sh --dry-run   rehearsal without a GPU (tiny sizes, about 2 minutes)
# ELSFAST_PYTHON picks the interpreter (default: python3 on PATH, the device image's).
set -u
cd "$(dirname "$0")/.." || exit 2
PY="${ELSFAST_PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONUNBUFFERED=1
exec "$PY" scripts/gpu_check.py --python "$PY" "$@"
