"""What this machine's kernels do with SmolLM2 in bf16, before any timing of decoding: the dtype ``auto`` picks for
SmolLM2 and for the 2048x2048 stand-in (and the one-off timings behind them), and for each linear shape of the model
and each row count 2-16, how exact verification computes a pass of that many rows (``RowInvariance.way``: one GEMM
where the kernel is row-invariant, else a column-major GEMM or one row per call). Prints one JSON object.

Usage (repository root, nothing else running): .venv/bin/python benchmarks/xeon_amx/probe.py > OUT.json
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from kangaroo_infer import KangarooModel
from kangaroo_infer.dtype import auto_dtype, machine

ROWS = (2, 3, 4, 5, 6, 8, 12, 16)


def main() -> None:
    km = KangarooModel.from_pretrained(None, adapter="checkpoints/smollm2-135m-instruct", dtype=torch.bfloat16)
    auto = {}
    for timed, config in (("2048x2048 layer (no model named)", None), ("SmolLM2's linears", km.base.config)):
        with tempfile.TemporaryDirectory() as home:  # a fresh choice, not one cached by an earlier run
            dtype, why = auto_dtype("cpu", Path(home), config=config)
            timing = json.loads((Path(home) / "dtype.json").read_text())  # the one-off timing behind it, seconds
        auto[timed] = {"dtype": str(dtype).removeprefix("torch."), "reason": why, "seconds": timing}
    invariance = km.backbone.invariance
    names = {module: name for name, module in km.base.named_modules()}
    layer = [*invariance.layer_linears[0], invariance.lm_head]
    ways = {
        names[linear].split(".")[-1]: {
            str(rows): getattr(invariance.way(linear, rows), "__name__", "one GEMM (row-invariant)") for rows in ROWS
        }
        for linear in layer
    }
    print(
        json.dumps(
            {
                "machine": machine("cpu"),
                "auto_dtype": auto,
                "way_per_linear_and_rows": ways,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
