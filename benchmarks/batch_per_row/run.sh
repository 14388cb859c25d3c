#!/usr/bin/env bash
# #25: batches after the scheduler prices a batch round by each row's own offer. Batched Kangaroo (defaults) against
# the base's batched generate, B = 4 and 8, the first 5 Spec-Bench questions per category (30), 128 tokens, greedy,
# in fp32 and in bf16, 2 threads, nothing else running (~20 min).
# Usage: bash benchmarks/batch_per_row/run.sh   (repository root, after scripts/setup.sh)
set -euo pipefail
questions=${QUESTIONS:-../shared/data/spec_bench/question.jsonl}
py=${PYTHON:-.venv/bin/python}
{ grep -m1 "model name" /proc/cpuinfo; grep -o 'avx512_bf16\|amx_bf16' /proc/cpuinfo | sort -u; nproc --all; date -I; } \
  > benchmarks/batch_per_row/cpu.txt
for dtype in float32 bfloat16; do
  "$py" -m kangaroo_infer bench --adapter checkpoints/smollm2-135m-instruct --questions "$questions" \
    --num-questions 5 --max-new-tokens 128 --dtype "$dtype" --batch-size 4,8  --out "benchmarks/batch_per_row/$dtype"
done
