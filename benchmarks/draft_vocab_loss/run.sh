#!/usr/bin/env bash
# #11 on this CPU: the training loss over the draft vocabulary (draft_vocab_loss=true, the default since 2026-12-02)
# against the loss over all 49,152 tokens (benchmarks/adapter_blocks/: main_mlp, main_mlp2, trained the same way
# with draft_vocab_loss=false).
# 1. The main job as `bash scripts/main.sh` runs it (experiment=smollm2_135m: one attention + MLP block), timed.
# 2. The same with two blocks (adapter.num_layers=2), reading the main job's data and feature cache.
# 3. The shipped adapter trained one more epoch on the main job's data with the new loss (adapter.init_from, lr 3e-4).
# Both adapters are scored on the base's greedy answers to Spec-Bench (the committed answers, 15 per category) and to
# the main job's 16 held-out ShareGPT prompts, then decoded adapter-only (--lookup-tokens 0) on the first 5 Spec-Bench
# questions per category, vanilla interleaved. Nothing else may run beside it: about 70 min on 2 quiet cores.
# Usage: bash benchmarks/draft_vocab_loss/run.sh [OUT_DIR]   (from the repository root)
set -euo pipefail
out=${1:-benchmarks/draft_vocab_loss}
work=${WORK:-outputs}
questions=${QUESTIONS:-../shared/data/spec_bench/question.jsonl}
py=${PYTHON:-.venv/bin/python}
main=$work/smollm2_135m

time KANGAROO_OUT=$main bash scripts/main.sh logger=csv data.num_conversations=800 trainer.val_check_interval=200  # the recipe of 2026-12-02
reuse="paths.data_dir=$main/data cache.dir=$main/features callbacks.onpolicy.cache_dir=$main/onpolicy"
"$py" -m kangaroo_train experiment=smollm2_135m data.num_conversations=800 trainer.val_check_interval=200 $reuse paths.output_dir="$work/main_vocab2" adapter.num_layers=2 \
  logger=csv resume=true
"$py" -m kangaroo_train experiment=smollm2_135m data.num_conversations=800 trainer.val_check_interval=200 $reuse paths.output_dir="$work/ft_vocab" \
  adapter.init_from=checkpoints/smollm2-135m-instruct optim.lr=3e-4 trainer.max_epochs=1 logger=csv resume=true

mkdir -p "$out/training"
for run in "main_vocab:$main" "main_vocab2:$work/main_vocab2" "ft_vocab:$work/ft_vocab"; do
  cp "${run#*:}/logs/csv/version_0/metrics.csv" "$out/training/metrics_${run%%:*}.csv"
done
"$py" benchmarks/finetune_shipped/score_held_out.py "$main"/onpolicy/answers-*.json "$main/adapter" \
  "$work/main_vocab2/adapter" checkpoints/smollm2-135m-instruct "$work/ft_vocab/adapter" | tee "$out/held_out.jsonl"
for run in "main_vocab:$main/adapter" "main_vocab2:$work/main_vocab2/adapter" "ft_vocab:$work/ft_vocab/adapter"; do
  "$py" -m kangaroo_infer eval-adapter --adapter "${run#*:}" --questions "$questions" \
    --answers benchmarks/spec_bench_smollm2/answers.jsonl --num-questions 15 --out "$out/eval_${run%%:*}.json"
done
for run in "main_vocab:$main/adapter" "main_vocab2:$work/main_vocab2/adapter"; do
  "$py" -m kangaroo_infer bench --adapter "${run#*:}" --questions "$questions" --num-questions 5 \
    --max-new-tokens 128 --lookup-tokens 0 --no-profile --out "$out/bench_${run%%:*}" --overwrite
done
