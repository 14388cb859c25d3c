#!/usr/bin/env bash
# #24: the main job in fp32 against bf16 at today's recipe, and what bf16's training speed buys for a CPU adapter.
# Each recipe trains SmolLM2-135M-Instruct's adapter (experiment=smollm2_135m: 550 ShareGPT conversations, attention +
# MLP, 2 epochs, bf16) with one thing changed; every adapter is then scored on the same on-policy answers: the base's
# bf16 greedy answers to the first 10 Spec-Bench questions per category (benchmarks/bf16_60/quiet/answers.jsonl),
# and the fp32 ones (benchmarks/spec_bench_60_peers/answers.jsonl, same questions) for the fp32 adapter.
# Nothing else may run beside it (the first recipe's wall time is a result). ~65 min on 2 quiet cores.
# Usage: bash benchmarks/cpu_adapter/run.sh [WORK_DIR]   (repository root, after scripts/setup.sh)
set -euo pipefail
work=${1:-outputs/cpu_adapter}
here=benchmarks/cpu_adapter
py=${PYTHON:-.venv/bin/python}
questions=${QUESTIONS:-../shared/data/spec_bench/question.jsonl}
mkdir -p "$work"
{ grep -m1 "model name" /proc/cpuinfo; grep -o 'avx512_bf16\|amx_bf16' /proc/cpuinfo | sort -u; nproc --all; date -I; } \
  > "$here/cpu.txt"
seconds() { local t0=$SECONDS; "$@" >&2; echo $((SECONDS - t0)); }  # the command's output goes to stderr
train() { "$py" -m kangaroo_train experiment=smollm2_135m paths.output_dir="$work/$1" resume=true logger=csv "${@:2}"; }
score() {  # run name, answers file, dtype[, adapter directory]
  "$py" -m kangaroo_infer eval-adapter --adapter "${4:-$work/$1/adapter}" --questions "$questions" --num-questions 10 \
    --answers "$2" --dtype "$3" --out "$here/eval_$1_$3.json" --overwrite
}
# 1. the main job in fp32 (its closing bench included, as bash scripts/main.sh runs it); bf16 took 13 min 5 s
#    (benchmarks/main_job/)
echo "fp32_550 seconds: $(seconds env KANGAROO_OUT="$work/fp32_550" bash scripts/main.sh model.dtype=float32 logger=csv)" \
  | tee -a "$here/times.txt"
# 2. more data: 1,600 conversations (caching grows with them; session 17 stopped it, see README.md)
echo "bf16_1600 seconds: $(seconds train bf16_1600 data.num_conversations=1600 trainer.val_check_interval=500)" \
  | tee -a "$here/times.txt"
# 3. a second block, on the default's own feature cache (copied from a default run, trained first if missing)
if [ ! -d "$work/bf16_550/features" ]; then
  echo "bf16_550 seconds: $(seconds train bf16_550)" | tee -a "$here/times.txt"
fi
mkdir -p "$work/bf16_550_2blocks" && cp -rn "$work/bf16_550/data" "$work/bf16_550/features" "$work/bf16_550_2blocks/"
echo "bf16_550_2blocks seconds: $(seconds train bf16_550_2blocks adapter.num_layers=2)" | tee -a "$here/times.txt"
for run in bf16_550 bf16_1600 bf16_550_2blocks fp32_550; do
  score "$run" benchmarks/bf16_60/quiet/answers.jsonl bfloat16
done
score shipped benchmarks/bf16_60/quiet/answers.jsonl bfloat16 checkpoints/smollm2-135m-instruct
score fp32_550 benchmarks/spec_bench_60_peers/answers.jsonl float32
score bf16_550 benchmarks/spec_bench_60_peers/answers.jsonl float32
