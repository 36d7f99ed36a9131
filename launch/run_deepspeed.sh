#!/usr/bin/env bash
# Train with the deepspeed launcher and --optimizer deepspeed (ShardedNovoGrad inside
# DeepSpeed ZeRO, via sharded_novograd.integrations.deepspeed).
#
#   bash launch/run_deepspeed.sh                                  # one node: every GPU, or 2 CPU ranks
#   HOSTFILE=launch/hostfile.example MASTER_ADDR=node0.example bash launch/run_deepspeed.sh
#
# Knobs (environment, with defaults):
#   NPROC            ranks on this node (no HOSTFILE): the number of GPUs with CUDA, else 2
#   HOSTFILE         empty: one node. Otherwise a DeepSpeed hostfile ("host slots=N" lines;
#                    see launch/hostfile.example); the launcher reaches each host over ssh
#   MASTER_ADDR      with HOSTFILE: an address of the first host that every host can reach
#   MASTER_PORT      29500
#   DS_CONFIG        configs/ds_zero2.json
#   CONFIG           configs/default.toml
#   PYTHON           .venv/bin/python if it exists, else python3
#   OMP_NUM_THREADS  1 on CPU (the deepspeed launcher does not set it)
# Every argument is passed on to launch/train.py.
set -ex
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
CONFIG=${CONFIG:-configs/default.toml}
DS_CONFIG=${DS_CONFIG:-configs/ds_zero2.json}
MASTER_PORT=${MASTER_PORT:-29500}
HOSTFILE=${HOSTFILE:-}
NGPU=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [ "$NGPU" -gt 0 ]; then
    NPROC=${NPROC:-$NGPU}
else
    NPROC=${NPROC:-2}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
fi
if [ -n "$HOSTFILE" ]; then
    WHERE=(--hostfile "$HOSTFILE" --master_addr "${MASTER_ADDR:?set MASTER_ADDR with HOSTFILE}")
else
    WHERE=(--num_gpus "$NPROC")
fi
"$PYTHON" -m deepspeed.launcher.runner "${WHERE[@]}" --master_port "$MASTER_PORT" \
    launch/train.py --config "$CONFIG" --optimizer deepspeed --ds-config "$DS_CONFIG" "$@"
