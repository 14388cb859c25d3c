#!/usr/bin/env bash
# #24's long run: all 480 Spec-Bench questions, 256 new tokens, bf16, shipped adapter, vanilla bf16 generate against
# Kangaroo's defaults (exact verification, packed weights), interleaved in one process. ~3 h on 2 quiet cores, so it
# runs in stages that resume each other: NUM_QUESTIONS is the first N per category (20, 40, 60, 80 = all), and each
# stage keeps the answers already in OUT (bench --resume; --num-questions is not a recorded setting). Nothing else may
# run beside it.
# Usage: NUM_QUESTIONS=20 bash benchmarks/bf16_480/run.sh [OUT_DIR]   (repository root, after scripts/setup.sh)
set -euo pipefail
out=${1:-benchmarks/bf16_480}
questions=${QUESTIONS:-../shared/data/spec_bench/question.jsonl}
py=${PYTHON:-.venv/bin/python}
n=${NUM_QUESTIONS:-80}
export OMP_NUM_THREADS=$(nproc)
mkdir -p "$out"
{ grep -m1 "model name" /proc/cpuinfo; grep -o 'avx512_bf16\|amx_bf16' /proc/cpuinfo | sort -u; nproc --all;
  echo "OMP_NUM_THREADS=$OMP_NUM_THREADS num_questions=$n"; date -Is; } >> "$out/cpu.txt"
"$py" -m kangaroo_infer bench --adapter checkpoints/smollm2-135m-instruct --questions "$questions" \
  --num-questions "$n" --max-new-tokens 256 --no-profile --dtype bfloat16 --out "$out" --resume
