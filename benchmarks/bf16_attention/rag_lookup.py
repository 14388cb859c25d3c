"""Where exactness costs most: copying long runs on RAG prompts in bf16.

On the first N RAG questions of Spec-Bench (~700-token prompts), 128 new tokens, greedy, bf16, one process, decoders
interleaved in rotating order: vanilla ``generate``, transformers' prompt lookup with 10 tokens, Kangaroo's defaults,
Kangaroo copying up to 10 tokens every round it can (``policy="fixed"``, lookup only) and Kangaroo's lookup alone under
the adaptive scheduler. For each Kangaroo decoder: how many rounds copied, drafted or stepped, how many tokens a
copying round verified and committed.
Usage (repository root, after scripts/setup.sh; nothing else running):
    python benchmarks/bf16_attention/rag_lookup.py [N]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from interleave import interleaved  # this directory's shared loop

from kangaroo_infer import KangarooModel, load_tokenizer
from kangaroo_infer.accept import cut_at_eos
from kangaroo_infer.dtype import machine
from kangaroo_infer.questions import chat_ids, load_questions

ADAPTER = "checkpoints/smollm2-135m-instruct"
MAX_NEW_TOKENS = 128


def main() -> None:
    per_category = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    km = KangarooModel.from_pretrained(None, ADAPTER, dtype="bfloat16")
    tokenizer = load_tokenizer(km.base)
    eos = km.resolve_eos("from_generation_config")
    questions = [
        q
        for q in load_questions("../shared/data/spec_bench/question.jsonl", num_questions=per_category)
        if q.category == "rag"
    ]

    def vanilla(**options):
        return lambda ids: (km.base.generate(ids, do_sample=False, max_new_tokens=MAX_NEW_TOKENS, **options), None)

    def kangaroo(**options):
        def decode(ids):
            out = km.generate(ids, max_new_tokens=MAX_NEW_TOKENS, **options)
            return out.sequences, out

        return decode

    decoders = {
        "vanilla": vanilla(),
        "prompt_lookup_10": vanilla(prompt_lookup_num_tokens=10),
        "kangaroo_defaults": kangaroo(),
        "kangaroo_copy_10_every_round": kangaroo(max_draft_steps=0, lookup_tokens=10, policy="fixed"),
        "kangaroo_lookup_adaptive": kangaroo(max_draft_steps=0),
    }
    names = list(decoders)
    totals = {n: {"tokens": 0, "seconds": 0.0, "identical": 0, "forwards": 0} for n in names}
    # per decoder and kind of round: [rounds, tokens proposed, tokens committed]
    rounds = {n: {"copy": [0, 0, 0], "adapter": [0, 0, 0], "plain": [0, 0, 0]} for n in names}
    prompts = [chat_ids(tokenizer, q.prompt, "cpu") for q in questions]  # [1, T] each
    for q, ids, timed in zip(questions, prompts, interleaved(decoders, prompts), strict=True):
        answers = {}
        for name, ((sequences, out), seconds) in timed.items():
            answers[name] = cut_at_eos(sequences[0, ids.shape[1] :].tolist(), eos)
            totals[name]["tokens"] += len(answers[name])
            totals[name]["seconds"] += seconds
            if out is not None:
                totals[name]["forwards"] += len(out.accept_lengths)
                copied = set(out.lookup_rounds)
                per_round = zip(out.draft_lengths, out.accept_lengths[1:], strict=True)  # the prefill left out
                for j, (drafts, committed) in enumerate(per_round):
                    kind = "copy" if j in copied else "adapter" if drafts else "plain"
                    for slot, x in enumerate((1, drafts, committed)):
                        rounds[name][kind][slot] += x
        for name in names:
            totals[name]["identical"] += answers[name] == answers["vanilla"]
        print(q.question_id, ids.shape[1], flush=True)
    vanilla_rate = totals["vanilla"]["tokens"] / totals["vanilla"]["seconds"]
    result = {"machine": machine(), "questions": len(questions), "max_new_tokens": MAX_NEW_TOKENS, "decoders": {}}
    for name in names:
        t = totals[name]
        rate = t["tokens"] / t["seconds"]
        record = {"tokens_per_s": rate, "vs_vanilla": rate / vanilla_rate, "identical": t["identical"]}
        if t["forwards"]:
            record["tau"] = t["tokens"] / t["forwards"]
            record["rounds"] = {
                kind: {"rounds": r, "drafts_per_round": d / r, "committed_per_round": c / r}
                for kind, (r, d, c) in rounds[name].items()
                if r
            }
        result["decoders"][name] = record
    (Path(__file__).parent / "rag_lookup.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["decoders"], indent=1))


if __name__ == "__main__":
    main()
