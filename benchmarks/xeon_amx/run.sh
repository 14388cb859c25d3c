#!/usr/bin/env bash
# Issue #24's measurements on a second CPU, an Intel Xeon with AMX (the first were on an AMD EPYC without it):
# what the kernels do (probe.py: the dtype `auto` picks, how exact verification computes each linear shape;
# linears.py: one layer's cost at 1-8 rows in fp32, bf16 and packed bf16), then the
# cost profile (a forward, a draft step, verification of 1-8 rows) at 128 and 700 tokens of context in bf16 with and
# without exact verification and in fp32. Then dtypes.py and the 60-question run (`benchmarks/bf16_60/run.sh`): README.md.
# Usage: bash benchmarks/xeon_amx/run.sh [OUT_DIR]   (repository root, after scripts/setup.sh; nothing else running)
set -euo pipefail
out=${1:-benchmarks/xeon_amx}
py=${PYTHON:-.venv/bin/python}
adapter=checkpoints/smollm2-135m-instruct
mkdir -p "$out/cost_profile"
{ grep -m1 "model name" /proc/cpuinfo; grep -m1 "cpu family" /proc/cpuinfo; grep -m1 "^model\s" /proc/cpuinfo
  grep -o 'avx512_bf16\|amx_bf16' /proc/cpuinfo | sort -u; nproc --all; date -I; } > "$out/cpu.txt"
"$py" benchmarks/xeon_amx/probe.py > "$out/probe.json"
"$py" benchmarks/xeon_amx/linears.py > "$out/linears.json"
for context in 128 700; do
  for run in "bfloat16 --exact-verify exact" "bfloat16 --no-exact-verify not-exact" "float32 --no-exact-verify fp32"; do
    set -- $run
    "$py" -m kangaroo_infer bench --cost-profile-only --adapter "$adapter" --dtype "$1" "$2" --context "$context" \
      --out "$out/cost_profile/${context}_$3"
  done
done
