#!/usr/bin/env bash
# Train with mpirun: train.py finds its rank and world size with mpi4py, and rank 0
# picks the torch.distributed rendezvous address and port.
#
#   bash launch/run_mpi.sh                                         # 2 ranks on this machine
#   NPROC=16 HOSTFILE=launch/hostfile.example MPI_FLAGS="--mca btl tcp,self,vader" bash launch/run_mpi.sh
#
# Knobs (environment, with defaults):
#   NPROC            2: ranks in all
#   HOSTFILE         empty: this machine only. Otherwise an Open MPI hostfile
#                    ("host slots=N" lines, see launch/hostfile.example)
#   MPI_FLAGS        one machine: "--mca btl self,vader" (ranks talk through shared memory);
#                    with HOSTFILE: empty. On a machine whose only interface is loopback, add
#                    "--mca oob_tcp_if_include lo" (on machines that also have another
#                    interface, Open MPI 5 may then find no interface for its own messages)
#   MPIRUN           .venv/bin/mpirun if it exists, else mpirun
#   MASTER_ADDR      unset: 127.0.0.1 on one machine, else rank 0's hostname
#   MASTER_PORT      unset: a free port picked by rank 0
#   CONFIG           configs/default.toml
#   PYTHON           .venv/bin/python if it exists, else python3
#   OMP_NUM_THREADS  1
# Every argument is passed on to launch/train.py. Under root, Open MPI needs
# OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1, which this script sets.
set -ex
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
MPIRUN=${MPIRUN:-.venv/bin/mpirun}
[ -x "$MPIRUN" ] || MPIRUN=mpirun
CONFIG=${CONFIG:-configs/default.toml}
NPROC=${NPROC:-2}
HOSTFILE=${HOSTFILE:-}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [ "$(id -u)" = 0 ]; then
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
PASS=(-x OMP_NUM_THREADS -x PATH)
[ -n "${MASTER_ADDR:-}" ] && PASS+=(-x MASTER_ADDR)
[ -n "${MASTER_PORT:-}" ] && PASS+=(-x MASTER_PORT)
if [ -n "$HOSTFILE" ]; then
    MPI_FLAGS=${MPI_FLAGS:-}
    WHERE=(--hostfile "$HOSTFILE")
else
    MPI_FLAGS=${MPI_FLAGS:---mca btl self,vader}
    WHERE=()
fi
# shellcheck disable=SC2086 # MPI_FLAGS is a list of flags
"$MPIRUN" -np "$NPROC" "${WHERE[@]}" $MPI_FLAGS "${PASS[@]}" \
    "$PYTHON" launch/train.py --config "$CONFIG" "$@"
