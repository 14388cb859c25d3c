#!/usr/bin/env bash
# #11 on this CPU: does self-distilled data give a better adapter than ShareGPT's replies at equal scale? Trains two
# adapters with the main job's recipe as it was then (experiment=smollm2_135m with the paper's attention adapter:
# ℓ=2, 2 epochs) on the same first
# 400 ShareGPT conversations, one on their replies (plain) and one on the base's own greedy answers (distilled), then
# scores both and the shipped adapter on the base's own greedy answers to Spec-Bench questions (eval-adapter) and
# times adapter-only decoding (bench --lookup-tokens 0). Nothing else may run beside it (~1.5 h on 2 cores, most of
# it the distillation; a rerun skips finished work).
# Usage: bash benchmarks/distill_vs_plain/run.sh [OUT_DIR]   (from the repository root, after scripts/setup.sh)
set -euo pipefail
out=${1:-benchmarks/distill_vs_plain}
work=${WORK:-outputs}
questions=${QUESTIONS:-../shared/data/spec_bench/question.jsonl}
py=${PYTHON:-.venv/bin/python}
n=${NUM_CONVERSATIONS:-400}

"$py" -m kangaroo_train experiment=smollm2_135m_distill distill.num_conversations="$n" \
  adapter=attention adapter.num_layers=1 paths.output_dir="$work/distill$n" draft_vocab_loss=false logger=csv resume=true
"$py" -m kangaroo_train experiment=smollm2_135m data.num_conversations="$n" \
  adapter=attention adapter.num_layers=1 paths.output_dir="$work/plain$n" draft_vocab_loss=false logger=csv resume=true

mkdir -p "$out"
for run in "plain$n:$work/plain$n/adapter" "distill$n:$work/distill$n/adapter" \
           "shipped:checkpoints/smollm2-135m-instruct"; do
  name=${run%%:*} adapter=${run#*:}
  "$py" -m kangaroo_infer eval-adapter --adapter "$adapter" --questions "$questions" --num-questions 2 \
    --max-new-tokens 128 --out "$out/eval_$name.json" | tee "$out/eval_$name.txt"
  [ "$name" = shipped ] && continue  # its speed is in benchmarks/round_shape
  "$py" -m kangaroo_infer bench --adapter "$adapter" --questions "$questions" --num-questions 1 \
    --max-new-tokens 128 --lookup-tokens 0 --no-profile --out "$out/bench_$name" --overwrite
done
