#!/usr/bin/env bash
# Side-by-side training-step benchmark on CPU gloo, then the report in docs/.
#
#   bash launch/run_benchmark.sh                    # N=2 and N=4, GPT and the 50M MLP, rebuilds docs
#   NPROCS=2 MODELS=gpt bash launch/run_benchmark.sh --profile
#   REPORT=0 bash launch/run_benchmark.sh           # measure only, leave docs/ alone
#
# Knobs (environment, with defaults):
#   NPROCS           "2 4"   world sizes, one torchrun invocation per (world size, model)
#   MODELS           "gpt mlp"
#   GPT_WARMUP/GPT_STEPS  3/10   untimed/timed steps of the GPT (the last warm-up step counts collectives)
#   MLP_WARMUP/MLP_STEPS  2/5    the same for the 50M-parameter MLP (seconds per step on 2 cores)
#   GPT_ROUNDS/MLP_ROUNDS 3/1    repeat the sequence of variants, pooling timed steps (evens out load drift)
#   BF16_CHECK       1       also a short bf16 GPT run at each world size (validates the bf16 memory model)
#   OUT              runs/benchmark
#   DOCS             docs    where benchmarks.md, bench_train_step.csv and the plots go
#   REPORT           1       rebuild the docs section from this run's results
#   PYTHON           .venv/bin/python if it exists, else python3
# Every argument is passed on to launch/benchmark.py (see --help).
set -ex
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
NPROCS=${NPROCS:-"2 4"}
MODELS=${MODELS:-"gpt mlp"}
GPT_WARMUP=${GPT_WARMUP:-3}
GPT_STEPS=${GPT_STEPS:-10}
MLP_WARMUP=${MLP_WARMUP:-2}
MLP_STEPS=${MLP_STEPS:-5}
GPT_ROUNDS=${GPT_ROUNDS:-3}
MLP_ROUNDS=${MLP_ROUNDS:-1}
OUT=${OUT:-runs/benchmark}
DOCS=${DOCS:-docs}
REPORT=${REPORT:-1}
BF16_CHECK=${BF16_CHECK:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
dirs=()
for n in $NPROCS; do
    for model in $MODELS; do
        if [ "$model" = mlp ]; then
            warmup=$MLP_WARMUP; steps=$MLP_STEPS; rounds=$MLP_ROUNDS
        else
            warmup=$GPT_WARMUP; steps=$GPT_STEPS; rounds=$GPT_ROUNDS
        fi
        "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$n" launch/benchmark.py \
            --out "$OUT/n${n}_${model}" --models "$model" --warmup "$warmup" --steps "$steps" \
            --rounds "$rounds" "$@"
        dirs+=("$OUT/n${n}_${model}")
    done
    if [ "$BF16_CHECK" = 1 ]; then
        "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$n" launch/benchmark.py \
            --out "$OUT/n${n}_gpt_bf16" --models gpt --dtype bf16 --warmup 2 --steps 3 "$@"
        dirs+=("$OUT/n${n}_gpt_bf16")
    fi
done
if [ "$REPORT" = 1 ]; then
    "$PYTHON" launch/benchmark.py report --inputs "${dirs[@]}" --docs "$DOCS" \
        --regenerate-command "bash launch/run_benchmark.sh"
fi
