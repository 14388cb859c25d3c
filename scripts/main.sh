#!/usr/bin/env bash
# The main job on the embedded default (SmolLM2-135M-Instruct, CPU). Sets up .venv on first use.
# Until the trainer lands this decodes one chat prompt with a FRESH (untrained, copy-initialised) adapter at exit
# layer 2: the output is exactly the base model's greedy output, but an untrained adapter drafts badly (τ ≈ 1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m kangaroo_infer generate --base smollm2-135m-instruct --exit-layer 2 --init copy --chat \
  --prompt "${1:-Explain in three sentences why the sky is blue.}" --max-new-tokens 128
