#!/bin/bash
# Single-node launcher: all stages on this machine; Lightning starts one process per device itself.
#   scripts/train_local.sh                              the default (smollm2_135m on CPU)
#   scripts/train_local.sh vicuna7b trainer.devices=4   an experiment plus Hydra overrides
#   CACHE_PROCS=8 scripts/train_local.sh vicuna7b       cache features with 8 processes (torchrun) first
set -euo pipefail
cd "$(dirname "$0")/.."

EXPERIMENT=${1:-smollm2_135m}
shift || true
OUTPUT_DIR=${OUTPUT_DIR:-outputs/${EXPERIMENT}}
ARGS=("experiment=${EXPERIMENT}" "paths.output_dir=${OUTPUT_DIR}" "$@")

if [[ -n "${CACHE_PROCS:-}" ]]; then
  # tokenize once, then split the feature cache over CACHE_PROCS processes (one per GPU)
  python -m kangaroo_train "${ARGS[@]}" stage=data
  torchrun --standalone --nproc_per_node="${CACHE_PROCS}" -m kangaroo_train "${ARGS[@]}" stage=cache
fi
# resume=true continues an interrupted run and starts fresh when there is nothing to continue
python -m kangaroo_train "${ARGS[@]}" resume=true
echo "adapter: ${OUTPUT_DIR}/adapter"
echo "try it:  python -m kangaroo_infer generate --adapter ${OUTPUT_DIR}/adapter --chat --prompt 'Hello!'"
