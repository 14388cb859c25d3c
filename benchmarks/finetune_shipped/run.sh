#!/usr/bin/env bash
# #11 on this CPU: does training the shipped adapter further on the base's own greedy answers raise its on-policy
# agreement? Fine-tunes checkpoints/smollm2-135m-instruct (adapter.init_from) on the 344 self-distilled conversations
# of benchmarks/distill_vs_plain (run that first: this reuses its distillation and feature cache), then scores both
# adapters on the base's greedy answers to Spec-Bench (the committed answers of benchmarks/spec_bench_smollm2, 15 per
# category) and to the run's held-out prompts, and times adapter-only decoding (first 10 questions per category).
# Also tried: the same from the shipped weights at exit layer 4 (a copy of the checkpoint whose config.json says
# exit_layer 4: the adapter's shapes do not depend on ℓ), and at ℓ = 2 with the loss at temperature 0.5 (sharper
# targets, meant to favour the top-1 choice). Nothing else may run beside it (~70 min on 2 cores).
# Usage: bash benchmarks/finetune_shipped/run.sh [OUT_DIR]   (from the repository root, after scripts/setup.sh)
set -euo pipefail
out=${1:-benchmarks/finetune_shipped}
work=${WORK:-outputs}
questions=${QUESTIONS:-../shared/data/spec_bench/question.jsonl}
py=${PYTHON:-.venv/bin/python}
shipped=checkpoints/smollm2-135m-instruct

"$py" -m kangaroo_train experiment=smollm2_135m_distill distill.num_conversations=400 \
  distill.dir="$work/distill400/distill" cache.dir="$work/distill400/features" \
  callbacks.onpolicy.cache_dir="$work/distill400/onpolicy" paths.output_dir="$work/ft_distill400" \
  adapter=attention_mlp adapter.num_layers=1 adapter.draft_vocab_size=16384 adapter.init_from="$shipped" \
  optim.lr=3e-4 draft_vocab_loss=false logger=csv resume=true

"$py" -m kangaroo_train experiment=smollm2_135m_distill distill.num_conversations=400 \
  distill.dir="$work/distill400/distill" cache.dir="$work/distill400/features" \
  callbacks.onpolicy.cache_dir="$work/distill400/onpolicy" paths.output_dir="$work/ft_t05_distill400" \
  adapter=attention_mlp adapter.num_layers=1 adapter.draft_vocab_size=16384 adapter.init_from="$shipped" \
  optim.lr=3e-4 temperature=0.5 draft_vocab_loss=false logger=csv resume=true

rm -rf "$work/shipped_l4" && cp -r "$shipped" "$work/shipped_l4"
"$py" -c 'import json, sys; p = sys.argv[1]; c = json.load(open(p)); c["exit_layer"] = 4; json.dump(c, open(p, "w"))' \
  "$work/shipped_l4/config.json"
"$py" -m kangaroo_train experiment=smollm2_135m_distill distill.num_conversations=400 \
  distill.dir="$work/distill400/distill" cache.dir="$work/distill400_l4/features" \
  callbacks.onpolicy.cache_dir="$work/distill400/onpolicy" paths.output_dir="$work/ft_l4_distill400" \
  adapter=attention_mlp adapter.num_layers=1 adapter.draft_vocab_size=16384 adapter.init_from="$work/shipped_l4" \
  model.exit_layer=4 optim.lr=3e-4 draft_vocab_loss=false logger=csv resume=true

mkdir -p "$out"
"$py" "$(dirname "$0")/score_held_out.py" "$work"/distill400/onpolicy/answers-*.json "$shipped" \
  "$work/ft_distill400/adapter" "$work/ft_l4_distill400/adapter" "$work/ft_t05_distill400/adapter" \
  | tee "$out/held_out.jsonl"
for name in ft_l4_distill400 ft_t05_distill400; do
  "$py" -m kangaroo_infer eval-adapter --adapter "$work/$name/adapter" --questions "$questions" \
    --answers benchmarks/spec_bench_smollm2/answers.jsonl --num-questions 15 --out "$out/eval_$name.json"
done
for run in "shipped:$shipped" "ft_distill400:$work/ft_distill400/adapter"; do
  name=${run%%:*} adapter=${run#*:}
  "$py" -m kangaroo_infer eval-adapter --adapter "$adapter" --questions "$questions" \
    --answers benchmarks/spec_bench_smollm2/answers.jsonl --num-questions 15 --out "$out/eval_$name.json"
  "$py" -m kangaroo_infer bench --adapter "$adapter" --questions "$questions" --num-questions 10 \
    --max-new-tokens 128 --lookup-tokens 0 --no-profile --out "$out/bench_$name" --overwrite
done
