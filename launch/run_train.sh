#!/usr/bin/env bash
# Train on one node with torchrun.
#
#   bash launch/run_train.sh                       # configs/default.toml on 2 CPU ranks (or every GPU)
#   NPROC=4 bash launch/run_train.sh --steps 50 --optimizer adamw
#   CONFIG=configs/gpt_small_gpu.toml bash launch/run_train.sh
#
# Knobs (environment, with defaults):
#   NPROC            ranks: the number of GPUs with CUDA, else 2
#   CONFIG           configs/default.toml
#   PYTHON           .venv/bin/python if it exists, else python3
#   OMP_NUM_THREADS  1 on CPU (each rank gets one core's worth of threads)
# Every argument is passed on to launch/train.py (see --help); its flags override CONFIG.
# The run prints where it wrote metrics.jsonl and loss.png.
set -ex
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
CONFIG=${CONFIG:-configs/default.toml}
NGPU=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [ "$NGPU" -gt 0 ]; then
    NPROC=${NPROC:-$NGPU}
else
    NPROC=${NPROC:-2}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
"$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" \
    launch/train.py --config "$CONFIG" "$@"
