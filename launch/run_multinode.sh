#!/usr/bin/env bash
# Train on several nodes with torchrun and a c10d rendezvous. Run the same command on
# every node, changing only NODE_RANK:
#
#   node 0:  NNODES=2 NODE_RANK=0 MASTER_ADDR=node0.example MASTER_PORT=29500 bash launch/run_multinode.sh
#   node 1:  NNODES=2 NODE_RANK=1 MASTER_ADDR=node0.example MASTER_PORT=29500 bash launch/run_multinode.sh
#
# Knobs (environment, with defaults):
#   NNODES           2
#   NODE_RANK        required: 0 on the node that hosts the rendezvous (MASTER_ADDR), 1.. elsewhere
#   MASTER_ADDR      required: an address of node 0 that every node can reach
#   MASTER_PORT      29500: a free TCP port on node 0 for the rendezvous store
#   NPROC            ranks per node: the number of GPUs with CUDA, else 1
#   RDZV_ID          sharded-novograd: a job id, the same on every node
#   CONFIG           configs/default.toml
#   PYTHON           .venv/bin/python if it exists, else python3
#   OMP_NUM_THREADS  1 on CPU
# Ranks are numbered by the rendezvous (node 0 is not guaranteed rank 0's node).
# Every argument is passed on to launch/train.py. Checkpoints (--checkpoint-dir) must be
# on a filesystem that every node sees.
set -ex
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
CONFIG=${CONFIG:-configs/default.toml}
NNODES=${NNODES:-2}
NODE_RANK=${NODE_RANK:?set NODE_RANK: 0 on the rendezvous host, 1..NNODES-1 elsewhere}
MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR to an address of node 0 that every node can reach}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-sharded-novograd}
NGPU=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [ "$NGPU" -gt 0 ]; then
    NPROC=${NPROC:-$NGPU}
else
    NPROC=${NPROC:-1}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
# is_host: node 0 serves the rendezvous store even when every node's address looks local.
IS_HOST=0
[ "$NODE_RANK" = 0 ] && IS_HOST=1
"$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc_per_node="$NPROC" --node_rank="$NODE_RANK" \
    --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$RDZV_ID" \
    --rdzv_conf="is_host=$IS_HOST" \
    launch/train.py --config "$CONFIG" "$@"
