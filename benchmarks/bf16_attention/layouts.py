"""Why a verified row's exact attention costs what it does: the one-row call's layout, timed and compared bit for bit.

transformers' sdpa path gives torch the decode step's query row as 9 query heads of one row each over 3 key/value
heads (``enable_gqa``, no mask): the call exact verification must repeat per row. When a mask is present it instead
packs each group's 3 query heads as 3 rows of one problem (``pack_gqa``). Both compute the same attention; this script
times the two layouts in bf16 (SmolLM2's 9 / 3 heads of 64) and counts, on random inputs, how often the packed
layout's output differs from the one-row call's in any bit. Random inputs can show a difference, never prove equality.
Usage (repository root, nothing else running): python benchmarks/bf16_attention/layouts.py
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from kangaroo_infer.dtype import machine

KEYS = (32, 128, 300, 700, 1024)
TRIALS = 20  # random problems per key count for the bit comparison
CALLS = 200  # timed calls per layout and key count (best of 3 repeats)


def best_us(fn, calls: int = CALLS, repeats: int = 3) -> float:
    """Best of ``repeats`` mean times of ``calls`` calls, in µs."""
    for _ in range(10):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def main() -> None:
    generator = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).bfloat16()

    rows = []
    for n in KEYS:
        query, key, value = randn(1, 9, 1, 64), randn(1, 3, n, 64), randn(1, 3, n, 64)  # the decode step's shapes

        def one_row(q=query, k=key, v=value):  # what transformers passes for one query row without a mask
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # [1, 9, 1, 64]

        def packed(q=query, k=key, v=value):  # each group's 3 query heads as 3 rows of one problem
            return F.scaled_dot_product_attention(q.view(1, 3, 3, 64), k, v).view(1, 9, 1, 64)

        differ = 0
        for _ in range(TRIALS):
            q, k, v = randn(1, 9, 1, 64), randn(1, 3, n, 64), randn(1, 3, n, 64)
            differ += not torch.equal(one_row(q, k, v), packed(q, k, v))
        row = {"keys": n, "one_row_us": best_us(one_row), "packed_us": best_us(packed), "packed_differs": differ}
        rows.append(row)
        print(row, flush=True)
    result = {"machine": machine(), "threads": torch.get_num_threads(), "trials": TRIALS, "layouts": rows}
    (Path(__file__).parent / "layouts.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
