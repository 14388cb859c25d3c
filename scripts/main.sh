#!/usr/bin/env bash
# The main job on the embedded default (SmolLM2-135M-Instruct, CPU, 2 cores): train the Kangaroo adapter at exit
# layer 2 on ShareGPT (experiment=smollm2_135m: tokenize -> cache base features -> train -> export), then run a short
# MT-bench benchmark (vanilla vs kangaroo in one process) and print its table. Sets up .venv on first use.
# Extra arguments are Hydra overrides for the training run, e.g. `bash scripts/main.sh trainer.max_epochs=1`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=${KANGAROO_OUT:-outputs/smollm2_135m}
.venv/bin/python -m kangaroo_train experiment=smollm2_135m paths.output_dir="$OUT" resume=true "$@"
.venv/bin/python -m kangaroo_infer bench --adapter "$OUT/adapter" --num-questions 1 --max-new-tokens 128 \
  --out "$OUT/bench" --overwrite
