#!/usr/bin/env bash
# The GPU checks of issue #24 in one run, for a session that is lent a CUDA machine (repository root there, with
# kangaroo's dependencies importable and the SmolLM2 alias materialisable; README.md beside this says how the first
# run was fed). In order of value, each capped so that a short lease still returns the first ones:
#   1. row_check.py: does exact verification equal generate's one-row step bit for bit on SmolLM2 at question 481
#      (with the one-row layout, and with the old strided one)?
#   2. the cost profile of the real model with and without exact verification (what exactness costs on the GPU);
#   3. Spec-Bench, first 3 questions per category, 128 tokens: defaults and --no-exact-verify, identity counted.
# Usage: [QUESTIONS=question.jsonl] [PYTHON=python3] bash benchmarks/cuda_bf16/run.sh OUT_DIR   (~6 min on one H200)
set -uo pipefail
out=${1:?name an output directory}
questions=${QUESTIONS:-../shared/data/spec_bench/question.jsonl}
py=${PYTHON:-python3}
adapter=checkpoints/smollm2-135m-instruct
mkdir -p "$out"
nvidia-smi -L > "$out/gpu.txt" 2>&1
timeout 120 "$py" benchmarks/cuda_bf16/row_check.py --device cuda --questions "$questions" 2>&1 | tee "$out/row_check.log"
for exact in exact-verify no-exact-verify; do
  timeout 60 "$py" -m kangaroo_infer bench --cost-profile-only --adapter "$adapter" --device cuda --"$exact" \
    --out "$out/cost_$exact"
done
for exact in exact-verify no-exact-verify; do
  timeout 150 "$py" -m kangaroo_infer bench --adapter "$adapter" --device cuda --"$exact" --questions "$questions" \
    --num-questions 3 --max-new-tokens 128 --no-profile --out "$out/bench_$exact" --resume
done
