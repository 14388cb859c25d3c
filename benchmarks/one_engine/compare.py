"""Issue #25's speed check: the engine before the refactor against after, in one process, on one loaded base.

The old code is a git worktree of an earlier commit, imported as the package ``kangaroo_infer_old`` (its imports are
relative, so a symlink under another name loads it beside the new ``kangaroo_infer``). Both wrap the same base model.
Single prompts: vanilla ``generate``, old/new defaults, old/new adapter only (``lookup_tokens=0``) and the new
defaults run as a batch of one (an attention mask: the batch engine), in rotating order per question. Batches of B:
the base's batched ``generate``, old and new batched Kangaroo, in rotating order. Every Kangaroo output is
compared with vanilla's (single: the prompt's own greedy ``generate``; batch rows:
the prompt's own single ``generate``, as the batch path promises). In bf16 the new engine's batches also run with
``exact_verify=False`` ("new_inexact": rows computed together, as batched ``generate`` computes them), and every
batch decoder's rows are also compared with batched ``generate``'s. Prints one JSON object and writes it to --out.

Usage (repository root, nothing else running):
    git worktree add /tmp/kangaroo-old <commit> && mkdir -p /tmp/old_pkg
    ln -sfn /tmp/kangaroo-old/kangaroo_infer /tmp/old_pkg/kangaroo_infer_old
    PYTHONPATH=/tmp/old_pkg .venv/bin/python benchmarks/one_engine/compare.py --out benchmarks/one_engine/fp32.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import kangaroo_infer_old as old  # the worktree's package (see the usage above)
import torch

import kangaroo_infer as new
from kangaroo_infer.accept import cut_at_eos
from kangaroo_infer.base import load_tokenizer
from kangaroo_infer.bench import left_padded
from kangaroo_infer.dtype import machine
from kangaroo_infer.questions import chat_ids, load_questions


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--questions", default="../shared/data/spec_bench/question.jsonl")
    parser.add_argument("--num-questions", type=int, default=5, help="per category")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-sizes", default="4,8")
    parser.add_argument("--adapter", default="checkpoints/smollm2-135m-instruct")
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--batches-only", action="store_true", help="single prompts: only vanilla (each row's own answer); no ratios"
    )
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    km_new = new.KangarooModel.from_pretrained("smollm2-135m-instruct", adapter=args.adapter, dtype=dtype)
    km_old = old.KangarooModel.from_pretrained(km_new.base, adapter=args.adapter)
    inexact = dtype != torch.float32  # fp32 is not exact-verified anyway
    km_fast = (
        new.KangarooModel.from_pretrained(km_new.base, adapter=args.adapter, exact_verify=False) if inexact else None
    )
    base, n = km_new.base, args.max_new_tokens
    tok = load_tokenizer(base)
    eos = km_new.resolve_eos("from_generation_config")
    pad = base.generation_config.pad_token_id or 0
    prompts = [chat_ids(tok, q.prompt, "cpu") for q in load_questions(args.questions, None, args.num_questions)]

    def greedy(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:  # [B, T] -> each row's new tokens
        out = base.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=pad)
        return [cut_at_eos(row, eos) for row in out[:, ids.shape[1] :].tolist()]

    def vanilla(ids):
        return greedy(ids, torch.ones_like(ids))[0]

    def kangaroo(km, ids, **kw):
        out = km.generate(ids, max_new_tokens=n, **kw)
        return out.sequences[0, ids.shape[1] :].tolist()

    single = {
        "vanilla": vanilla,
        "old_defaults": lambda ids: kangaroo(km_old, ids),
        "new_defaults": lambda ids: kangaroo(km_new, ids),
        "old_adapter_only": lambda ids: kangaroo(km_old, ids, lookup_tokens=0),
        "new_adapter_only": lambda ids: kangaroo(km_new, ids, lookup_tokens=0),
        "new_batch_of_one": lambda ids: kangaroo(km_new, ids, attention_mask=torch.ones_like(ids)),
    }
    if args.batches_only:
        single = {"vanilla": vanilla}
    for fn in single.values():  # warm-up
        fn(prompts[0])
    seconds = dict.fromkeys(single, 0.0)
    tokens = dict.fromkeys(single, 0)
    identical = dict.fromkeys(single, 0)
    own: list[list[int]] = []  # each prompt's own vanilla answer
    names = list(single)
    with torch.inference_mode():
        for i, ids in enumerate(prompts):
            order = names[i % len(names) :] + names[: i % len(names)]
            outs = {}
            for name in order:
                outs[name], t = timed(lambda name=name, ids=ids: single[name](ids))
                seconds[name] += t
                tokens[name] += len(outs[name])
            own.append(outs["vanilla"])
            for name in names:
                identical[name] += outs[name] == outs["vanilla"]
    result = {
        "machine": machine(),
        "dtype": args.dtype,
        "questions": len(prompts),
        "max_new_tokens": n,
        "single": {
            name: {
                "tokens_per_s": tokens[name] / seconds[name],
                "identical": f"{identical[name]}/{len(prompts)}",
            }
            for name in names
        },
    }
    single_res = result["single"]
    speed = {name: run["tokens_per_s"] for name, run in single_res.items()}
    if not args.batches_only:
        single_res["batch_of_one_vs_prompt_path"] = speed["new_batch_of_one"] / speed["new_defaults"]
        for kind in ("defaults", "adapter_only"):
            single_res[f"new_vs_old_{kind}"] = speed[f"new_{kind}"] / speed[f"old_{kind}"]
            single_res[f"new_{kind}_vs_vanilla"] = speed[f"new_{kind}"] / speed["vanilla"]

    batch_res = {}
    for size in [int(b) for b in args.batch_sizes.split(",") if b]:
        secs = {"vanilla": 0.0, "old": 0.0, "new": 0.0, **({"new_inexact": 0.0} if inexact else {})}
        toks = dict.fromkeys(secs, 0)
        rows_equal = dict.fromkeys([name for name in secs if name != "vanilla"], 0)
        rows_batched = dict.fromkeys(rows_equal, 0)
        with torch.inference_mode():
            for j, start in enumerate(range(0, len(prompts), size)):
                group = prompts[start : start + size]
                ids, mask = left_padded(group, pad)

                def run_km(km, ids=ids, mask=mask):
                    out = km.generate(ids, attention_mask=mask, max_new_tokens=n)
                    rows = out.sequences[:, ids.shape[1] :].tolist()
                    return [r[: sum(a)] for r, a in zip(rows, out.accept_lengths, strict=True)]

                runs = {
                    "vanilla": lambda ids=ids, mask=mask: greedy(ids, mask),
                    "old": lambda run_km=run_km: run_km(km_old),
                    "new": lambda run_km=run_km: run_km(km_new),
                }
                if inexact:
                    runs["new_inexact"] = lambda run_km=run_km: run_km(km_fast)
                order = list(runs)[j % len(runs) :] + list(runs)[: j % len(runs)]
                outs = {}
                for name in order:
                    outs[name], t = timed(runs[name])
                    secs[name] += t
                    toks[name] += sum(len(r) for r in outs[name])
                for name in rows_equal:
                    rows_equal[name] += sum(a == b for a, b in zip(outs[name], own[start : start + size], strict=True))
                    rows_batched[name] += sum(a == b for a, b in zip(outs[name], outs["vanilla"], strict=True))
        batch_res[str(size)] = {
            **{f"{name}_tokens_per_s": toks[name] / secs[name] for name in secs},
            "new_vs_old": (toks["new"] / secs["new"]) / (toks["old"] / secs["old"]),
            "new_vs_vanilla_batched": (toks["new"] / secs["new"]) / (toks["vanilla"] / secs["vanilla"]),
            "old_vs_vanilla_batched": (toks["old"] / secs["old"]) / (toks["vanilla"] / secs["vanilla"]),
            **(
                {
                    "new_inexact_vs_vanilla_batched": (toks["new_inexact"] / secs["new_inexact"])
                    / (toks["vanilla"] / secs["vanilla"])
                }
                if inexact
                else {}
            ),
            "rows_equal_own_generate": {name: f"{v}/{len(prompts)}" for name, v in rows_equal.items()},
            "rows_equal_batched_generate": {name: f"{v}/{len(prompts)}" for name, v in rows_batched.items()},
        }
    result["batch"] = batch_res
    text = json.dumps(result, indent=1)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
