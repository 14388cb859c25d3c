#!/usr/bin/env bash
# #24: bf16 with packed weights (kangaroo_infer/packed.py) and exact verification, the defaults where bf16 is native.
# 1. Cost profiles (context 128): exact / fast verification, each with and without packed weights.
# 2. One bench run: vanilla bf16 generate against Kangaroo's defaults, the adapter alone, Kangaroo without drafting
#    (`plain`: what the packed kernels alone give) and transformers' prompt lookup (4 and 10 tokens), interleaved in
#    one process. The first 3 Spec-Bench questions per category (NUM_QUESTIONS), 128 tokens, shipped adapter, 2 threads.
# Nothing else may run beside it: ~17 min on 2 quiet cores.
# Usage: bash benchmarks/bf16_packed/run.sh [OUT_DIR]   (from the repository root, after scripts/setup.sh)
set -euo pipefail
out=${1:-benchmarks/bf16_packed}
questions=${QUESTIONS:-../shared/data/spec_bench/question.jsonl}
py=${PYTHON:-.venv/bin/python}
n=${NUM_QUESTIONS:-3}
mkdir -p "$out"
{ grep -m1 "model name" /proc/cpuinfo; grep -o 'avx512_bf16\|amx_bf16' /proc/cpuinfo | sort -u; nproc; date -I; } > "$out/cpu.txt"
for exact in exact-verify no-exact-verify; do
  for pack in pack-weights no-pack-weights; do
    "$py" -m kangaroo_infer bench --adapter checkpoints/smollm2-135m-instruct --dtype bfloat16 "--$exact" "--$pack" \
      --cost-profile-only --out "$out/cost_profile_${exact}_${pack}"
  done
done
"$py" -m kangaroo_infer bench --adapter checkpoints/smollm2-135m-instruct --questions "$questions" \
  --num-questions "$n" --max-new-tokens 128 --no-profile --dtype bfloat16 --peers adapter,plain,pld --pld-tokens 4,10 \
  --out "$out/bench" --overwrite
