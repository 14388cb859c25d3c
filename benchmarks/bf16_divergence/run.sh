#!/usr/bin/env bash
# bf16 divergence of the fast verification vs the batched-generate noise floor (issue #24): 30 questions, 128 tokens.
cd "$(dirname "$0")/../.." && WANDB_MODE=offline HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false .venv/bin/python benchmarks/bf16_divergence/run.py "$@"
