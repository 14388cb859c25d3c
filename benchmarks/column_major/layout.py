"""Why a row-dependent bf16 linear can run its rows in one GEMM: the input's layout decides how oneDNN sums a row.

SmolLM2's down projection (1536 -> 576, bf16) on M rows, three ways, against M one-row products (the one-row decode
step's call, the reference): one GEMM over row-major input (what a multi-row pass does by itself), one packed row per
call (what exact verification did before), one GEMM over the rows laid out column-major (the transpose made
contiguous). Counts differing outputs over many random inputs and times each way (best of 200-call means, 3 rounds).
Prints JSON; writes it to --out.

Usage (repository root, nothing else running): .venv/bin/python benchmarks/column_major/layout.py --out F.json
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch

from kangaroo_infer.dtype import machine
from kangaroo_infer.packed import PackedWeights

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bf16_attention"))
from layouts import best_us  # noqa: E402  (the sibling benchmark's timing: best of 3 means of 200 calls)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--trials", type=int, default=100, help="random inputs per row count")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(576, 1536, generator=gen) * 0.02).to(torch.bfloat16)  # [N, K]
    packing = PackedWeights()

    def one_row(x: torch.Tensor) -> torch.Tensor:  # the reference: each row alone, as the decode step calls it
        return torch.cat([torch.nn.functional.linear(r[None], weight) for r in x])

    ways = {
        "row-major GEMM": lambda x: torch.nn.functional.linear(x, weight),
        "packed, one row per call": lambda x: torch.cat([packing.linear(r[None], weight, None) for r in x]),
        "column-major GEMM": lambda x: torch.nn.functional.linear(x.t().contiguous().t(), weight),
    }
    result = {"machine": machine(torch.device("cpu")), "shape": [576, 1536], "rows": {}}
    with torch.inference_mode():
        for rows in (1, 2, 3, 4, 8, 16):
            inputs = [torch.randn(rows, 1536, generator=gen).to(torch.bfloat16) for _ in range(args.trials)]
            refs = [one_row(x) for x in inputs]
            entry = {}
            for name, fn in ways.items():
                differing = sum(int((fn(x) != ref).sum()) for x, ref in zip(inputs, refs, strict=True))
                us = best_us(partial(fn, inputs[0]))
                entry[name] = {"differing_outputs": differing, "of": rows * 576 * args.trials, "us": round(us, 1)}
            result["rows"][rows] = entry
            print(rows, json.dumps(entry), flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
