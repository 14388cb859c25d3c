#!/usr/bin/env bash
# The round-shape measurements (#12): first 5 Spec-Bench questions per category, 128 tokens, the shipped adapter,
# vanilla and kangaroo interleaved in one process per run; adapter-only (--lookup-tokens 0) and the default under
# three conditions, batches at B = 4 and 8, sampling with lookup at T = 0.7 and 1.0. Nothing else may run beside it.
# Usage: bash benchmarks/round_shape/run.sh [OUT_DIR]   (from the repository root, after scripts/setup.sh)
set -euo pipefail
out=${1:-benchmarks/round_shape}
questions=${QUESTIONS:-../shared/data/spec_bench/question.jsonl}
py=${PYTHON:-.venv/bin/python}
bench() { "$py" -m kangaroo_infer bench --adapter checkpoints/smollm2-135m-instruct --questions "$questions" \
  --max-new-tokens 128 --no-profile "$@"; }
busy_pid=
trap '[ -n "$busy_pid" ] && kill "$busy_pid" 2>/dev/null || true' EXIT

for condition in quiet omp1 busy; do
  threads=2
  [ "$condition" = omp1 ] && threads=1
  if [ "$condition" = busy ]; then  # one competing process, pinned to the second core
    taskset -c 1 sh -c 'while :; do :; done' & busy_pid=$!
  fi
  OMP_NUM_THREADS=$threads bench --num-questions 5 --lookup-tokens 0 --out "$out/$condition/adapter_only"
  OMP_NUM_THREADS=$threads bench --num-questions 5 --out "$out/$condition/default"
  [ -n "$busy_pid" ] && { kill "$busy_pid"; busy_pid=; }
  if [ "$condition" = quiet ]; then
    OMP_NUM_THREADS=2 bench --num-questions 5 --batch-size 4,8 --out "$out/quiet/batch"
    for t in 0.7 1.0; do
      OMP_NUM_THREADS=2 bench --num-questions 3 --temperature "$t" --out "$out/quiet/sampling_t$t"
    done
  fi
done
