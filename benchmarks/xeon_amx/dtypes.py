"""Which dtype fits this machine for decoding: vanilla ``generate`` and Kangaroo's defaults, each in fp32 and bf16, in
one process, interleaved in rotating order per question (the first N Spec-Bench questions per category, 128 new
tokens, shipped adapter). Kangaroo's answers are compared with vanilla's in the same dtype. Prints one JSON object and
writes it to --out.

Usage (repository root, nothing else running):
    .venv/bin/python benchmarks/xeon_amx/dtypes.py --num-questions 2 --out benchmarks/xeon_amx/dtypes.json
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
from kangaroo_infer.dtype import machine
from kangaroo_infer.questions import chat_ids, load_questions


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--questions", default="../shared/data/spec_bench/question.jsonl")
    parser.add_argument("--num-questions", type=int, default=2, help="per category")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--adapter", default="checkpoints/smollm2-135m-instruct")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    n = args.max_new_tokens
    models = {
        name: KangarooModel.from_pretrained(None, adapter=args.adapter, dtype=dtype)
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
    }
    tok = load_tokenizer(models["fp32"].base)
    eos = models["fp32"].resolve_eos("from_generation_config")
    prompts = [chat_ids(tok, q.prompt, "cpu") for q in load_questions(args.questions, None, args.num_questions)]

    def vanilla(km: KangarooModel, ids: torch.Tensor) -> list[int]:
        out = km.base.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
        return cut_at_eos(out[0, ids.shape[1] :].tolist(), eos)

    def kangaroo(km: KangarooModel, ids: torch.Tensor) -> list[int]:
        return km.generate(ids, max_new_tokens=n).sequences[0, ids.shape[1] :].tolist()

    kinds = {"vanilla": vanilla, "kangaroo": kangaroo}
    decoders = {f"{kind}_{dtype}": (dtype, fn) for dtype in models for kind, fn in kinds.items()}
    for dtype, fn in decoders.values():  # warm-up (and the bf16 probes)
        fn(models[dtype], prompts[0])
    seconds, tokens = dict.fromkeys(decoders, 0.0), dict.fromkeys(decoders, 0)
    identical = {dtype: 0 for dtype in models}
    names = list(decoders)
    with torch.inference_mode():
        for i, ids in enumerate(prompts):
            outs = {}
            for name in names[i % len(names) :] + names[: i % len(names)]:
                dtype, fn = decoders[name]
                start = time.perf_counter()
                outs[name] = fn(models[dtype], ids)
                seconds[name] += time.perf_counter() - start
                tokens[name] += len(outs[name])
            for dtype in models:
                identical[dtype] += outs[f"kangaroo_{dtype}"] == outs[f"vanilla_{dtype}"]
    speed = {name: tokens[name] / seconds[name] for name in names}
    fastest_vanilla = max(speed["vanilla_fp32"], speed["vanilla_bf16"])
    result = {
        "machine": machine(),
        "questions": len(prompts),
        "max_new_tokens": n,
        "tokens_per_s": speed,
        "vs_fastest_vanilla": {name: s / fastest_vanilla for name, s in speed.items()},
        "kangaroo_identical_to_vanilla_same_dtype": {d: f"{identical[d]}/{len(prompts)}" for d in models},
    }
    text = json.dumps(result, indent=1)
    print(text)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
