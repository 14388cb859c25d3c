#!/usr/bin/env bash
# The test command: sets up .venv on first use, runs ruff, then the fast default set (`-m "not slow"`: every module,
# tiny random models) on one pytest-xdist worker per core, up to 4 (each test runs one thread; ~5 minutes on 2 cores,
# ~9.5 on one). Arguments replace that default and go to pytest as they are (add `-n 2` to spread them too):
#   bash scripts/test.sh -m slow                  # only the slow set (SLURM, DeepSpeed, DDP, full chi-square, SmolLM2)
#   bash scripts/test.sh -m "slow or not slow"    # everything, one test at a time (.ci/run: the default set
#                                                 # spread over the cores, then the slow set)
#   bash scripts/test.sh tests/test_lossless.py   # one file, slow tests included
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export WANDB_MODE=offline HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python -m ruff check kangaroo_infer tests $( [ -d kangaroo_train ] && echo kangaroo_train )
if [ "$#" -eq 0 ]; then
    set -- -m "not slow" -n auto --maxprocesses 4
fi
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
