#!/usr/bin/env bash
# #24's principal run: Spec-Bench questions (the first NUM_QUESTIONS per category, default 10: 60 questions), 128 new
# tokens, bf16, shipped adapter, one process, decoders interleaved in rotating order: vanilla bf16 generate,
# Kangaroo's defaults (exact verification, packed weights), the adapter alone, transformers' prompt lookup (4 and 10
# tokens) and vanilla generate in float32 (the base loaded again in fp32: what a machine without native bf16 runs).
# CONDITION: quiet (default: 2 threads, nothing else may run), omp1 (OMP_NUM_THREADS=1) or busy (2 threads beside a
# busy loop pinned to the second core). ~40 min for 60 questions on 2 quiet cores.
# Usage: [CONDITION=...] [NUM_QUESTIONS=...] bash benchmarks/bf16_60/run.sh [OUT_DIR]   (repository root, after
# scripts/setup.sh)
set -euo pipefail
condition=${CONDITION:-quiet}
out=${1:-benchmarks/bf16_60/$condition}
questions=${QUESTIONS:-../shared/data/spec_bench/question.jsonl}
py=${PYTHON:-.venv/bin/python}
n=${NUM_QUESTIONS:-10}
threads=$(nproc)
busy_pid=
trap '[ -n "$busy_pid" ] && kill "$busy_pid" 2>/dev/null || true' EXIT
case "$condition" in
  quiet) ;;
  omp1) threads=1 ;;
  busy) taskset -c 1 sh -c 'while :; do :; done' & busy_pid=$! ;;
  *) echo "CONDITION must be quiet, omp1 or busy" >&2; exit 2 ;;
esac
export OMP_NUM_THREADS=$threads
mkdir -p "$out"
{ grep -m1 "model name" /proc/cpuinfo; grep -o 'avx512_bf16\|amx_bf16' /proc/cpuinfo | sort -u; nproc --all;
  echo "condition=$condition OMP_NUM_THREADS=$OMP_NUM_THREADS"; date -I; } > "$out/cpu.txt"
"$py" -m kangaroo_infer bench --adapter checkpoints/smollm2-135m-instruct --questions "$questions" \
  --num-questions "$n" --max-new-tokens 128 --no-profile --dtype bfloat16 --peers adapter,pld,fp32 \
  --pld-tokens 4,10 --out "$out" --resume
