#!/usr/bin/env bash
# #24: Kangaroo in bf16 with exact verification (the default where bf16 is native), against vanilla bf16 generate,
# the adapter alone and transformers' prompt lookup (4 and 10 tokens) in the same run; then the same defaults with
# --no-exact-verify (fast, not token-identical); then vanilla fp32 for the fp32 baseline. The first 5 Spec-Bench
# questions per category, 128 tokens, shipped adapter, 2 threads. Cost profiles (verify 1/2/4/8 rows) with and without
# exact verification. Nothing else may run beside it: ~25 min on 2 quiet cores.
# Usage: bash benchmarks/bf16_exact/run.sh [OUT_DIR]   (from the repository root, after scripts/setup.sh)
set -euo pipefail
out=${1:-benchmarks/bf16_exact}
questions=${QUESTIONS:-../shared/data/spec_bench/question.jsonl}
py=${PYTHON:-.venv/bin/python}
n=${NUM_QUESTIONS:-5}
bench() { "$py" -m kangaroo_infer bench --adapter checkpoints/smollm2-135m-instruct --questions "$questions" \
  --num-questions "$n" --max-new-tokens 128 --no-profile "$@"; }
grep -m1 "model name" /proc/cpuinfo > "$out/cpu.txt"; grep -o 'avx512_bf16\|amx_bf16' /proc/cpuinfo | sort -u >> "$out/cpu.txt"
for exact in exact-verify no-exact-verify; do
  "$py" -m kangaroo_infer bench --adapter checkpoints/smollm2-135m-instruct --dtype bfloat16 "--$exact" \
    --cost-profile-only --out "$out/cost_profile_$exact"
done
bench --dtype bfloat16 --peers adapter,pld --pld-tokens 4,10 --out "$out/bf16_exact"
bench --dtype bfloat16 --no-exact-verify --out "$out/bf16_fast"
bench --dtype float32 --out "$out/fp32"
