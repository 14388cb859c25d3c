#!/usr/bin/env bash
# #11: how much of adapter-only Kangaroo's speedup the adapter's drafts earn. The first 10 Spec-Bench questions per
# category, 128 tokens, the shipped adapter with lookup off (--lookup-tokens 0), beside kangaroo-plain (Kangaroo's
# loop with no drafting at all, --peers plain), vanilla interleaved per question; with 2 threads and with 1
# (OMP_NUM_THREADS=1, a slower machine's stand-in). Nothing else may run beside it: about 40 min on 2 quiet cores.
# Usage: bash benchmarks/adapter_vs_plain/run.sh [OUT_DIR]   (from the repository root, after scripts/setup.sh)
set -euo pipefail
out=${1:-benchmarks/adapter_vs_plain}
questions=${QUESTIONS:-../shared/data/spec_bench/question.jsonl}
py=${PYTHON:-.venv/bin/python}
for threads in 2 1; do
  OMP_NUM_THREADS=$threads "$py" -m kangaroo_infer bench --adapter checkpoints/smollm2-135m-instruct \
    --questions "$questions" --num-questions 10 --max-new-tokens 128 --lookup-tokens 0 --peers plain --no-profile \
    --out "$out/threads_$threads"
done
