"""Is sdpa the fastest vanilla attention for SmolLM2 in bf16 on this CPU, and does Kangaroo stay exact on an eager base?

Vanilla bf16 ``generate`` with transformers' sdpa attention (the default) and with its eager attention, and Kangaroo's
defaults (exact verification, packed weights, shipped adapter) on each of the two bases; greedy, first N Spec-Bench
questions per category, 128 new tokens, one process, the four decoders interleaved in rotating order. Each Kangaroo is
compared with vanilla ``generate`` on its own base (exactness is to the attention the user's model runs).
Usage (repository root, after scripts/setup.sh; nothing else running): python benchmarks/bf16_attention/run.py [N]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from interleave import interleaved  # this directory's shared loop
from transformers import AutoModelForCausalLM

from kangaroo_infer import KangarooModel, load_tokenizer
from kangaroo_infer.accept import cut_at_eos
from kangaroo_infer.base import resolve_base_path
from kangaroo_infer.dtype import machine
from kangaroo_infer.questions import chat_ids, load_questions

ADAPTER = "checkpoints/smollm2-135m-instruct"
MAX_NEW_TOKENS = 128


def main() -> None:
    per_category = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    km_sdpa = KangarooModel.from_pretrained(None, ADAPTER, dtype="bfloat16")
    path = resolve_base_path(km_sdpa.base.config.name_or_path)
    eager = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="eager").eval()
    km_eager = KangarooModel.from_pretrained(eager, ADAPTER)
    tokenizer = load_tokenizer(km_sdpa.base)
    eos = km_sdpa.resolve_eos("from_generation_config")
    questions = load_questions("../shared/data/spec_bench/question.jsonl", num_questions=per_category)

    def vanilla(model):
        return lambda ids: model.generate(ids, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)[0, ids.shape[1] :]

    def kangaroo(km):
        return lambda ids: km.generate(ids, max_new_tokens=MAX_NEW_TOKENS).sequences[0, ids.shape[1] :]

    decoders = {
        "vanilla_sdpa": vanilla(km_sdpa.base),
        "vanilla_eager": vanilla(eager),
        "kangaroo_sdpa": kangaroo(km_sdpa),
        "kangaroo_eager": kangaroo(km_eager),
    }
    names = list(decoders)
    rows = []
    prompts = [chat_ids(tokenizer, q.prompt, "cpu") for q in questions]  # [1, T] each
    for q, ids, timed in zip(questions, prompts, interleaved(decoders, prompts), strict=True):
        row = {"category": q.category, "question_id": q.question_id, "prompt_tokens": ids.shape[1]}
        for name, (new_tokens, seconds) in timed.items():
            row[name] = {"tokens": cut_at_eos(new_tokens.tolist(), eos), "seconds": seconds}
        rows.append(row)
        print(q.category, ids.shape[1], {n: round(len(row[n]["tokens"]) / row[n]["seconds"], 1) for n in names})

    def tps(row: dict, name: str) -> float:
        return len(row[name]["tokens"]) / row[name]["seconds"]

    result = {
        "machine": machine(),
        "questions": len(rows),
        "max_new_tokens": MAX_NEW_TOKENS,
        "tokens_per_s": {n: sum(len(r[n]["tokens"]) for r in rows) / sum(r[n]["seconds"] for r in rows) for n in names},
        "mean_ratio_vs_vanilla_sdpa": {
            n: sum(tps(r, n) / tps(r, "vanilla_sdpa") for r in rows) / len(rows) for n in names
        },
        "identical": {
            f"{a} vs {b}": sum(r[a]["tokens"] == r[b]["tokens"] for r in rows)
            for a, b in (
                ("kangaroo_sdpa", "vanilla_sdpa"),
                ("kangaroo_eager", "vanilla_eager"),
                ("vanilla_eager", "vanilla_sdpa"),
            )
        },
        "per_question": [
            {k: r[k] for k in ("category", "question_id", "prompt_tokens")} | {n: tps(r, n) for n in names}
            for r in rows
        ],
    }
    out = Path(__file__).parent / "result.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "per_question"}, indent=1))


if __name__ == "__main__":
    main()
