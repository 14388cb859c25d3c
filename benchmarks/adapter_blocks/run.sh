#!/usr/bin/env bash
# #11 on this CPU: does adapter capacity (an MLP, a second block) raise on-policy agreement?
# 1. The main job's data and schedule (800 ShareGPT conversations, l = 2, 2 epochs, fp32 on CPU) trained from scratch
#    with three adapters: the paper's attention-only block (the main job's adapter until 2026-11-30), one attention +
#    MLP block (the main job's adapter since), and two such blocks (adapter.num_layers=2). All three read the main
#    job's tokenized data and feature cache (run the main job of that day first: `bash scripts/main.sh
#    model.dtype=float32 data.num_conversations=800 trainer.val_check_interval=200`).
# 2. The shipped adapter grown to two blocks (adapter.init_from, the new block silenced at the start) and trained
#    668 steps on the 344 self-distilled conversations of benchmarks/distill_vs_plain (run that first), as
#    benchmarks/finetune_shipped trained the one-block shipped adapter (its control).
# Every adapter is scored on the base's greedy answers to Spec-Bench (the committed answers, 15 per category) and to
# the held-out ShareGPT prompts of the distill runs (10) and of the main job (16). Nothing timed runs here; about
# 90 min on 2 quiet cores.
# Usage: bash benchmarks/adapter_blocks/run.sh [OUT_DIR]   (from the repository root, after scripts/setup.sh)
set -euo pipefail
out=${1:-benchmarks/adapter_blocks}
work=${WORK:-outputs}
questions=${QUESTIONS:-../shared/data/spec_bench/question.jsonl}
py=${PYTHON:-.venv/bin/python}
main=$work/smollm2_135m
reuse="paths.data_dir=$main/data cache.dir=$main/features callbacks.onpolicy.cache_dir=$main/onpolicy"

for run in "main_attn:attention:1" "main_mlp:attention_mlp:1" "main_mlp2:attention_mlp:2"; do
  IFS=: read -r name adapter blocks <<< "$run"
  "$py" -m kangaroo_train experiment=smollm2_135m model.dtype=float32 data.num_conversations=800 trainer.val_check_interval=200 $reuse paths.output_dir="$work/$name" \
    adapter="$adapter" adapter.draft_vocab_size=16384 adapter.num_layers="$blocks" draft_vocab_loss=false logger=csv resume=true
done

"$py" -m kangaroo_train experiment=smollm2_135m_distill distill.num_conversations=400 \
  distill.dir="$work/distill400/distill" cache.dir="$work/distill400/features" \
  callbacks.onpolicy.cache_dir="$work/distill400/onpolicy" paths.output_dir="$work/ft2_distill400" \
  adapter=attention_mlp adapter.draft_vocab_size=16384 adapter.init_from=checkpoints/smollm2-135m-instruct \
  adapter.num_layers=2 optim.lr=3e-4 draft_vocab_loss=false logger=csv resume=true

mkdir -p "$out"
adapters="$work/main_attn/adapter $work/main_mlp/adapter $work/main_mlp2/adapter $work/ft2_distill400/adapter"
for answers in "$work"/distill400/onpolicy/answers-*.json "$main"/onpolicy/answers-*.json; do
  "$py" benchmarks/finetune_shipped/score_held_out.py "$answers" $adapters
done | tee "$out/held_out.jsonl"
for name in main_attn main_mlp main_mlp2 ft2_distill400; do
  "$py" -m kangaroo_infer eval-adapter --adapter "$work/$name/adapter" --questions "$questions" \
    --answers benchmarks/spec_bench_smollm2/answers.jsonl --num-questions 15 --out "$out/eval_$name.json"
done
