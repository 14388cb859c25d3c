"""One linear layer of SmolLM2 at 1-8 rows on this CPU: fp32 ``F.linear`` (MKL), bf16 ``F.linear`` (oneDNN, what
vanilla ``generate`` runs) and bf16 on weights packed once (``packed.py``, what Kangaroo runs), best of 50 calls in
µs, and whether each bf16 row count of the packed kernel is bit-equal to ``F.linear`` (``PackedWeights``'s probe).
Prints one JSON object.

Usage (repository root, nothing else running): .venv/bin/python benchmarks/xeon_amx/linears.py > OUT.json
"""

from __future__ import annotations

import json
from functools import partial

import torch

from kangaroo_infer.dtype import call_seconds, machine
from kangaroo_infer.packed import PackedWeights

SHAPES = {"q/o": (576, 576), "k/v": (192, 576), "gate/up": (1536, 576), "down": (576, 1536), "lm_head": (49152, 576)}
ROWS = (1, 2, 3, 4, 8)
CALLS = 50


def best_us(fn) -> float:
    fn()
    return min(call_seconds(fn, CALLS)) * 1e6


@torch.inference_mode()
def main() -> None:
    torch.manual_seed(0)
    packing = PackedWeights()
    table = {}
    for name, (out_features, in_features) in SHAPES.items():
        weight = torch.randn(out_features, in_features) / in_features**0.5
        bf16 = weight.bfloat16()
        packed = packing.pack(bf16)
        rows_table = {}
        for rows in ROWS:
            x = torch.randn(rows, in_features)
            xb = x.bfloat16()
            rows_table[str(rows)] = {
                "fp32_us": best_us(partial(torch.nn.functional.linear, x, weight)),
                "bf16_us": best_us(partial(torch.nn.functional.linear, xb, bf16)),
                "bf16_packed_us": best_us(partial(packing.run, xb, packed, None)),
                "packed_bit_equal": packing._probe(bf16, None, packed, rows),
            }
        table[name] = rows_table
    print(json.dumps({"machine": machine(), "best_of_calls": CALLS, "linears": table}, indent=1))


if __name__ == "__main__":
    main()
