#!/usr/bin/env bash
# The recorder's steady-state throughput on one GPU (issue: GPU throughput, measured in steady state):
# the OLMo-7B-0424 shape with random weights in bfloat16, 2,048 texts of 1,024 tokens, every recorder batch
# paired with the plain HF forward pass on the same tokens. Prints the ratio overall and for the last
# quarter of the batches, tokens/s and peak GPU memory. About 6 minutes on an H200.
#   bash benchmarks/gpu_steady_state.sh [BATCH]        (default 32)
#   SMALL=1 bash benchmarks/gpu_steady_state.sh        the same script at a CPU-sized shape, to check it runs
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
batch=${1:-32}
if [ "${SMALL:-0}" = 1 ]; then
  exec $PY benchmarks/bench_recorder.py --device cpu --dtype float32 --layers 2 --d-model 128 --d-mlp 352 \
    --heads 4 --vocab 512 --texts 64 --length 128 --batch-size 8 --reducer torch --compile off --skip-write
fi
exec $PY benchmarks/bench_recorder.py --device cuda --dtype bfloat16 --layers 32 --d-model 4096 --d-mlp 11008 \
  --heads 32 --vocab 50304 --texts 2048 --length 1024 --batch-size "$batch" --reducer torch --compile on --skip-write
