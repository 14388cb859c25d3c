"""Draft trees in batches on SmolLM2: rows identical to each prompt's own greedy ``generate``, and the speed of a
batch of trees beside a batch of chains and the base's own batched ``generate``.

For each batch of B Spec-Bench prompts (left-padded), in rotating order within one process: the base's batched
``generate``, Kangaroo's batch with its defaults (adapter chains and lookup copies), Kangaroo's batch with
``tree=True`` (a draft tree per row where the scheduler finds it pays, lookup copies between), and the same forced to
draw a tree every round (``policy="fixed"``, no lookup: every round verifies trees, to check identity on real
trees). Every Kangaroo row is compared with that prompt's own unbatched greedy ``generate`` (run once per prompt,
first). Prints one JSON object and writes it to --out.

Usage (repository root, nothing else running):
    .venv/bin/python benchmarks/batch_trees/run.py --dtype bfloat16 --max-new-tokens 128 \
        --out benchmarks/batch_trees/bf16.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from kangaroo_infer import KangarooModel
from kangaroo_infer.accept import cut_at_eos
from kangaroo_infer.base import load_tokenizer
from kangaroo_infer.bench import left_padded
from kangaroo_infer.dtype import machine
from kangaroo_infer.questions import chat_ids, load_questions


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--questions", default="../shared/data/spec_bench/question.jsonl")
    parser.add_argument("--num-questions", type=int, default=2, help="per category")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--adapter", default="checkpoints/smollm2-135m-instruct")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    km = KangarooModel.from_pretrained("smollm2-135m-instruct", adapter=args.adapter, dtype=getattr(torch, args.dtype))
    base, n, size = km.base, args.max_new_tokens, args.batch_size
    tok = load_tokenizer(base)
    eos = km.resolve_eos("from_generation_config")
    pad = base.generation_config.pad_token_id or 0
    prompts = [chat_ids(tok, q.prompt, "cpu") for q in load_questions(args.questions, None, args.num_questions)]

    def greedy(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:  # [B, T] -> each row's new tokens
        out = base.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=pad)
        return [cut_at_eos(row, eos) for row in out[:, ids.shape[1] :].tolist()]

    seconds = {
        "vanilla_batched": 0.0,
        "kangaroo_batch": 0.0,
        "kangaroo_batch_tree": 0.0,
        "kangaroo_batch_tree_fixed": 0.0,
    }
    tokens = dict.fromkeys(seconds, 0)
    rows_equal = {name: 0 for name in seconds if name != "vanilla_batched"}
    tree_rounds = dict.fromkeys(rows_equal, 0)
    with torch.inference_mode():
        own = [greedy(p, torch.ones_like(p))[0] for p in prompts]
        for j, start in enumerate(range(0, len(prompts), size)):
            group = prompts[start : start + size]
            ids, mask = left_padded(group, pad)

            def kangaroo(ids=ids, mask=mask, **kw):
                out = km.generate(ids, attention_mask=mask, max_new_tokens=n, **kw)
                rows = out.sequences[:, ids.shape[1] :].tolist()
                rows = [r[: sum(a)] for r, a in zip(rows, out.accept_lengths, strict=True)]
                trees = [
                    sum(d > 0 and i not in set(c) for i, d in enumerate(row))
                    for row, c in zip(out.draft_lengths, out.lookup_rounds, strict=True)
                ]
                return rows, sum(trees)

            runs = {
                "vanilla_batched": lambda ids=ids, mask=mask: (greedy(ids, mask), 0),
                "kangaroo_batch": kangaroo,
                "kangaroo_batch_tree": lambda kangaroo=kangaroo: kangaroo(tree=True),
                "kangaroo_batch_tree_fixed": lambda kangaroo=kangaroo: kangaroo(
                    tree=True, policy="fixed", lookup_tokens=0
                ),
            }
            order = list(runs)[j % len(runs) :] + list(runs)[: j % len(runs)]
            for name in order:
                begin = time.perf_counter()
                rows, adapter_rounds = runs[name]()
                seconds[name] += time.perf_counter() - begin
                tokens[name] += sum(len(r) for r in rows)
                if name in rows_equal:
                    rows_equal[name] += sum(a == b for a, b in zip(rows, own[start : start + size], strict=True))
                if name in tree_rounds:
                    tree_rounds[name] += adapter_rounds  # row-rounds that verified adapter drafts (a tree or chain)
    speed = {name: tokens[name] / seconds[name] for name in seconds}
    result = {
        "machine": machine(),
        "dtype": args.dtype,
        "questions": len(prompts),
        "batch_size": size,
        "max_new_tokens": n,
        "tokens_per_s": speed,
        "vs_vanilla_batched": {name: speed[name] / speed["vanilla_batched"] for name in rows_equal},
        "rows_equal_own_generate": {name: f"{v}/{len(prompts)}" for name, v in rows_equal.items()},
        "row_rounds_with_adapter_drafts": tree_rounds,
    }
    text = json.dumps(result, indent=1)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
