#!/usr/bin/env bash
# The test command: sets up .venv on first use, then runs the whole suite (tiny random models, plus the slow
# end-to-end tests on the real SmolLM2-135M). Extra arguments go to pytest, e.g. `-m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export WANDB_MODE=offline HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python -m ruff check kangaroo_infer tests $( [ -d kangaroo_train ] && echo kangaroo_train )
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
