#!/usr/bin/env bash
# #11: how much of Kangaroo's speedup the adapter's drafts earn. The first 10 Spec-Bench questions per category,
# 128 tokens, the shipped adapter, vanilla interleaved per question:
# 1. lookup off (--lookup-tokens 0: the adapter alone) beside kangaroo-plain (Kangaroo's loop with no drafting at all,
#    --peers plain), with 2 threads and with 1 (OMP_NUM_THREADS=1, a slower machine's stand-in);
# 2. the defaults (adapter + lookup) beside kangaroo-plain and kangaroo-lookup (lookup alone), 2 threads.
# Nothing else may run beside it: about an hour on 2 quiet cores.
# Usage: bash benchmarks/adapter_vs_plain/run.sh [OUT_DIR]   (from the repository root, after scripts/setup.sh)
set -euo pipefail
out=${1:-benchmarks/adapter_vs_plain}
questions=${QUESTIONS:-../shared/data/spec_bench/question.jsonl}
py=${PYTHON:-.venv/bin/python}
bench() { "$py" -m kangaroo_infer bench --adapter checkpoints/smollm2-135m-instruct --questions "$questions" \
  --num-questions 10 --max-new-tokens 128 --no-profile "$@"; }
for threads in 2 1; do
  OMP_NUM_THREADS=$threads bench --lookup-tokens 0 --peers plain --out "$out/threads_$threads"
done
OMP_NUM_THREADS=2 bench --peers plain,lookup --out "$out/default_threads_2"
