#!/usr/bin/env bash
# Everything that needs a GPU, in one command (one CUDA GPU; no network, no DeepSpeed).
#
#   bash launch/gpu_check.sh                          # about 5-8 minutes; prints the results file
#   bash launch/gpu_check.sh --out /tmp/gpu.json      # where the results go
#   bash launch/gpu_check.sh --only memcheck bench-aligned
#   bash launch/gpu_check.sh --list                   # the steps and their time limits
#   bash launch/gpu_check.sh --dry-run                # on CPU: every step small, to check the script
#
# Knobs (environment, with defaults):
#   PYTHON         .venv/bin/python if it exists, else python3
#   GPU_CHECK_OUT  gpu_check.json: the results file (--out overrides it)
# Every argument is passed on to launch/gpu_check.py (see --help). Exit status 0 only
# when every step that ran passed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
exec "$PYTHON" launch/gpu_check.py "$@"
