"""The next GPU session's first check (benchmarks/cuda_bf16/README.md, result 6): where does exact verification part
from generate's one-row step on SmolLM2 at a real prompt?

For one Spec-Bench question (default 481, the one exact-mode difference on the H200):
1. vanilla bf16 ``generate`` twice (is it deterministic?) and Kangaroo with exact verification once; the first position
   where they differ;
2. after the prompt's prefill, a verification pass of R rows (the answer's next R tokens) through every layer under
   exact verification, each row's hidden state at every layer and its logits against one-row forwards through the
   model (what generate computes), bit for bit; again with each row's query and keys passed as views into the pass
   and the cache (the layout before ``invariance.one_row_layout``), to see whether the layout changes the bits there.
Run from the repository root: python benchmarks/cuda_bf16/row_check.py --device cuda [--question 481 --rows 2,4]
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch

sys.path.insert(0, ".")
from kangaroo_infer import KangarooModel, invariance, load_tokenizer  # noqa: E402
from kangaroo_infer.bench import first_difference  # noqa: E402
from kangaroo_infer.questions import chat_prompt_ids, load_questions  # noqa: E402
from tests.test_bf16 import one_row_states, pass_states  # noqa: E402


def row_states(km: KangarooModel, prefill, tokens: torch.Tensor, mode: str) -> list[list[torch.Tensor]]:
    """``pass_states`` of tokens [1, R] after the prefill. ``mode``: exact (as decoding runs it: on CUDA each row's
    query, keys and values in the one-row step's layout, ``invariance.one_row_layout``), strided (exact, but each
    row's query and keys as views into the pass and the cache, as before that layout) or batched (no exact
    verification: the check must see differences there)."""
    backbone, layout, saved = km.backbone, invariance.one_row_layout, km.backbone.invariance
    if mode == "strided":
        invariance.one_row_layout = lambda q, k, v: (q, k, v)
    if mode == "batched":
        backbone.invariance = None
    try:
        return pass_states(backbone, copy.deepcopy(prefill), tokens)
    finally:
        invariance.one_row_layout, backbone.invariance = layout, saved


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--questions", default="../shared/data/spec_bench/question.jsonl")
    p.add_argument("--question", type=int, default=481)
    p.add_argument("--rows", default="2,4", help="comma-separated verification widths to check")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--adapter", default="checkpoints/smollm2-135m-instruct")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    km = KangarooModel.from_pretrained(None, adapter=args.adapter, dtype="bfloat16", device=args.device)
    assert km.backbone.invariance is not None
    tok = load_tokenizer(km.base)
    (q,) = [q for q in load_questions(args.questions) if q.question_id == args.question]
    ids = torch.tensor([chat_prompt_ids(tok, q.prompt)], device=args.device)
    n, start = args.max_new_tokens, ids.shape[1]
    vanilla = [km.base.generate(ids, do_sample=False, max_new_tokens=n)[0, start:].tolist() for _ in range(2)]
    out = km.generate(ids, max_new_tokens=n)
    kangaroo = out.sequences[0, start:].tolist()
    print(f"question {q.question_id}: prompt {start} tokens; vanilla twice identical: {vanilla[0] == vanilla[1]}; "
          f"kangaroo exact first difference: {first_difference(kangaroo, vanilla[0])}; "
          f"draft lengths of the first rounds: {out.draft_lengths[:8]}", flush=True)  # fmt: skip
    prefill = km.base(ids, use_cache=True).cache
    answer = torch.tensor([vanilla[0]], device=args.device)
    for rows in [int(r) for r in args.rows.split(",")]:
        expected = one_row_states(km.base, copy.deepcopy(prefill), answer[:, :rows])
        for mode in ("exact", "strided", "batched"):
            got = row_states(km, prefill, answer[:, :rows], mode)
            report = []
            for r in range(rows):
                depth = next((d for d, (a, b) in enumerate(zip(got[r], expected[r], strict=True))
                              if not torch.equal(a, b)), None)  # fmt: skip
                report.append("equal" if depth is None else f"differs from layer {depth}")
            print(f"{rows} rows, {mode}: " + "; ".join(f"row {r} {s}" for r, s in
                                                                          enumerate(report)), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
