"""answers.jsonl records and results.json summaries: one shape for every decoder.

A record is one question: ``question_id``, ``category``, ``source_category``, ``prompt_sha256``, ``tstamp`` and
``decoders``: {name: run}, a run being ``turns``, ``new_tokens``, ``wall_time``, ``accept_lengths`` (tokens
committed per full-model forward), ``decoding_steps`` (those forwards), ``identical`` (its tokens equal vanilla's;
None when sampled), where they differ ``first_difference`` (the first new token that does), and for Kangaroo's own
loop ``draft_lengths`` and ``lookup_rounds``.

Records of the earlier schema (Kangaroo's run at the top level, ``tree`` and ``peers`` under keys, vanilla as
``vanilla_*`` fields), which ``--resume`` and ``eval-adapter --answers`` meet in older directories, are converted
by ``upgrade_record`` when read; anything else is refused, never guessed at.
"""

from __future__ import annotations

import statistics
from typing import Any

from .decoders import KANGAROO, TREE, VANILLA, Decoder, DecoderRun

QUESTION_KEYS = ("question_id", "category", "source_category", "prompt_sha256", "tstamp")
RUN_KEYS = ("turns", "new_tokens", "wall_time", "accept_lengths", "decoding_steps", "draft_lengths", "lookup_rounds",
            "identical", "first_difference")  # fmt: skip


def first_difference(tokens: list[int], reference: list[int]) -> int | None:
    """Index of the first token where ``tokens`` departs from ``reference`` (None if equal); when one is a prefix of
    the other, where the shorter ends. Where an inexact decoder diverged tells a near-tie from a bug."""
    for i, (a, b) in enumerate(zip(tokens, reference, strict=False)):
        if a != b:
            return i
    return None if len(tokens) == len(reference) else min(len(tokens), len(reference))


def run_record(run: DecoderRun, tokenizer: Any, reference: list[int] | None) -> dict[str, Any]:
    """A run as a record holds it; ``reference``: vanilla's tokens (None when sampled: identity not checked)."""
    record: dict[str, Any] = {
        "turns": [tokenizer.decode(run.tokens, skip_special_tokens=True)],
        "new_tokens": len(run.tokens),
        "wall_time": run.wall_time,
        "accept_lengths": run.accept_lengths,
        "decoding_steps": run.decoding_steps,
    }
    if run.draft_lengths is not None:
        record["draft_lengths"], record["lookup_rounds"] = run.draft_lengths, run.lookup_rounds
    record["identical"] = None if reference is None else run.tokens == reference
    if record["identical"] is False:
        record["first_difference"] = first_difference(run.tokens, reference)
    return record


def upgrade_record(record: Any) -> dict[str, Any]:
    """A record in this schema; one of the earlier schema converted (see the module's docstring)."""
    if isinstance(record, dict) and isinstance(record.get("decoders"), dict):
        return record
    if not isinstance(record, dict) or not isinstance(record.get("turns"), list) or "category" not in record:
        raise ValueError("not a bench answer record: it needs category and decoders (or, as bench wrote before, turns)")
    kangaroo = {k: record[k] for k in RUN_KEYS if k in record}
    if "decoding_steps" not in kangaroo and isinstance(record.get("accept_lengths"), list):
        kangaroo["decoding_steps"] = len(record["accept_lengths"])
    identical = record.get("identical")
    vanilla: dict[str, Any] = {}
    if isinstance(record.get("vanilla_turns"), list):
        vanilla["turns"] = record["vanilla_turns"]
    elif identical is True:  # Kangaroo's tokens equalled vanilla's: so does its text
        vanilla["turns"] = record["turns"]
    if "vanilla_new_tokens" in record:
        n = record["vanilla_new_tokens"]
        vanilla.update(new_tokens=n, wall_time=record.get("vanilla_wall_time"), accept_lengths=[1] * n)
        vanilla["decoding_steps"] = n  # one token per forward: plain decoding
    elif identical is True and "new_tokens" in record:
        vanilla["new_tokens"] = record["new_tokens"]
    vanilla["identical"] = None if identical is None else True
    decoders = {VANILLA: vanilla, KANGAROO: kangaroo}
    if isinstance(record.get("tree"), dict):
        decoders[TREE] = dict(record["tree"])
    decoders.update(record.get("peers") or {})
    return {**{k: record[k] for k in QUESTION_KEYS if k in record}, "decoders": decoders}


def summarize(records: list[dict], decoder: str) -> dict[str, Any]:
    """One decoder against vanilla: speedup = mean over questions of its tokens/s ÷ vanilla's; τ = its new tokens ÷
    its full-model forwards; identical = every output equals vanilla's (None when sampled)."""
    runs = [r["decoders"][decoder] for r in records]
    v_tps = [r["decoders"][VANILLA]["new_tokens"] / r["decoders"][VANILLA]["wall_time"] for r in records]
    tps = [r["new_tokens"] / r["wall_time"] for r in runs]
    return {
        "speedup": statistics.fmean(k / v for k, v in zip(tps, v_tps, strict=True)),
        "tau": sum(r["new_tokens"] for r in runs) / max(sum(r["decoding_steps"] for r in runs), 1),
        "tokens_per_s": statistics.fmean(tps),
        "vanilla_tokens_per_s": statistics.fmean(v_tps),
        "identical": None if any(r["identical"] is None for r in runs) else all(r["identical"] for r in runs),
        "questions": len(records),
    }


def summarize_by_category(records: list[dict], decoder: str) -> dict[str, Any]:
    categories = list(dict.fromkeys(r["category"] for r in records))
    return {
        "overall": summarize(records, decoder),
        "categories": {c: summarize([r for r in records if r["category"] == c], decoder) for c in categories},
    }


def summarize_decoders(records: list[dict], decoders: list[Decoder]) -> dict[str, Any]:
    """results.json's ``decoders``: per decoder compared with vanilla, its settings and the overall and
    per-category summaries."""
    return {
        d.name: {"settings": d.settings, **summarize_by_category(records, d.name)}
        for d in decoders
        if d.name != VANILLA
    }
