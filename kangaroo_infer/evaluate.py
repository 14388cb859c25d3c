"""On-policy evaluation of an adapter: how often it drafts what the base model itself would say.

Held-out scores on ShareGPT replies measure the adapter on text the base did not write; at decoding time every draft
is checked against the base's own greedy choice. This module scores the adapter teacher-forced on the base's own
greedy answers:

- ``greedy_answers``: the base's greedy answer to each prompt, one prompt at a time (``base.generate(do_sample=False)``
  per prompt, so each answer is exactly that prompt's own greedy decode; a left-padded batch can flip near-ties
  through float rounding, which is why batching is not used).
- ``score_answer``: one forward pass of layers [0, ℓ) over prompt + answer gives the exit states; layers [ℓ, L) give
  the full model's logits; the adapter runs causally over the exit states and the draft head (the LM head, or only
  the rows of the adapter's draft vocabulary, as decoding uses it) gives the draft logits. Scored are the answer
  positions that decoding drafts from: position t holds answer token i >= 0 and predicts answer token i + 1 (the
  first answer token comes from the prefill, never from a draft).

Metrics per position: top-1 agreement (the draft's argmax, mapped to a token id, equals the full model's argmax:
on a greedy answer, the next token) and Σ_v min(p, q) (p the full model's softmax, q the draft softmax, zero outside
a draft vocabulary): the chance that speculative sampling accepts the draft.

Agreement at draft depth d: the chance that d chained greedy drafts from a position all match the base. While the
drafts match, the token the adapter drafted *is* the next answer token, so the exit state that the shallow layers
compute for it and everything the adapter has seen equal the teacher-forced ones; the d-th draft then equals the
teacher-forced draft d - 1 positions later. Depth-d agreement at position t is therefore "the teacher-forced drafts
at t .. t + d - 1 all match" (counted where the answer has d more tokens), exact without running the chain again
(``tests/test_evaluate.py`` checks it against ``draft.draft_proposal``). With a fixed γ and no early stop a round
commits 1 + (number of leading drafts that match) tokens, so 1 + Σ_{d<=γ} agreement(d) estimates τ (the estimate
weights every position alike; real rounds start where the previous one ended).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel

from .adapter import KangarooAdapter
from .arch import CAUSAL, Backbone
from .bench.records import upgrade_record
from .checks import check_int
from .draft import DraftHead
from .files import check_file_target, write_file
from .packed import packed_linears
from .questions import Question, chat_prompt_ids, default_questions, jsonl_records, load_questions


@dataclass
class EvalAnswer:
    """A prompt and the base's greedy answer to it (token ids; the answer may end with an end-of-sequence token)."""

    prompt_ids: list[int]
    answer_ids: list[int]
    category: str = "all"
    question_id: Any = None


@dataclass
class AnswerScore:
    """Per scored position of one answer (position i predicts answer token i + 1)."""

    top1: list[bool]  # draft argmax == full-model argmax
    accept: list[float]  # Σ_v min(p, q)
    match: list[bool]  # draft argmax == the next answer token (what chained drafting needs)
    greedy_mismatches: int  # answer tokens the full model would not have chosen greedily (0 for a greedy answer)
    answer_tokens: int  # answer tokens scored (after truncation to the greedy prefix, if asked)


@torch.inference_mode()
def greedy_answers(
    base: PreTrainedModel, prompts: list[list[int]], max_new_tokens: int, progress: bool = False
) -> list[list[int]]:
    """The base's greedy answer to each prompt: ``base.generate(do_sample=False)`` on that prompt alone.

    Stops at the base generation config's end-of-sequence token (kept as the answer's last token) or after
    ``max_new_tokens``. A bf16 base on CPU runs its linears packed (``packed.packed_linears``: bit-equal, faster).
    """
    check_int("max_new_tokens", max_new_tokens, 1, rule="be a positive integer")
    if not prompts:
        raise ValueError("No prompts to answer; give at least one prompt.")
    if not all(prompts):
        raise ValueError("A prompt is empty (0 tokens); give at least one token per prompt.")
    device = next(base.parameters()).device
    pad = base.generation_config.pad_token_id
    if pad is None:
        eos = base.generation_config.eos_token_id
        pad = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
    iterator: Iterable = prompts
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(prompts, desc="greedy answers", unit="prompt")
    answers = []
    with packed_linears(base):
        for prompt in iterator:
            ids = torch.tensor([prompt], device=device)  # [1, T]
            out = base.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
            answers.append(out[0, ids.shape[1] :].tolist())
    return answers


@torch.inference_mode()
def score_answer(
    backbone: Backbone,
    adapter: KangarooAdapter,
    head: DraftHead,
    prompt_ids: list[int],
    answer_ids: list[int],
    truncate_to_greedy: bool = False,
) -> AnswerScore:
    """Teacher-forced scores of the adapter on one answer (see the module docstring).

    ``truncate_to_greedy`` keeps only the answer's leading tokens that the full model chooses greedily (for answers
    that were re-tokenized from text: the rest is not known to be the base's own output).
    """
    if not prompt_ids:
        raise ValueError("The prompt is empty; every answer needs the prompt it answers.")
    ell, device = adapter.config.exit_layer, backbone.embed_tokens.weight.device
    ids = torch.tensor([prompt_ids + answer_ids], device=device)  # [1, T]
    total, start = ids.shape[1], len(prompt_ids) - 1  # position `start` (last prompt token) predicts answer token 0
    if not answer_ids:
        return AnswerScore([], [], [], 0, 0)
    positions = torch.arange(total, device=device)
    hidden = backbone.embed_tokens(ids)  # [1, T, H]
    pe = backbone.rotary_emb(hidden, position_ids=positions[None])
    cache = DynamicCache()
    exit_states = backbone.run_layers(hidden, 0, ell, pe, positions, cache)  # [1, T, H]
    final = backbone.run_layers(exit_states, ell, backbone.num_layers, pe, positions, cache)  # [1, T, H]
    full_logits = backbone.lm_head(backbone.norm(final[:, start : total - 1]))[0].float()  # [A, V]
    answer = ids[0, start + 1 :]  # [A]
    greedy = full_logits.argmax(-1)  # [A]
    consistent = greedy == answer
    kept = len(answer_ids)
    if truncate_to_greedy and not bool(consistent.all()):
        kept = int((~consistent).nonzero()[0, 0])
    mismatches = int((~consistent[:kept]).sum())
    if kept < 2:  # nothing is drafted from an answer of fewer than 2 tokens
        return AnswerScore([], [], [], mismatches, kept)

    param = next(adapter.parameters())
    mask = CAUSAL.bias(positions, 0, None, param.dtype, backbone.eager)
    out = adapter(exit_states.to(param.dtype), position_embeddings=pe, attention_mask=mask)  # [1, T, H]
    rows = slice(start + 1, start + kept)  # positions holding answer tokens 0 .. kept-2
    draft_logits = head.logits(out[0, rows].to(head.weight.dtype)).float()  # [n, V_draft]
    full = full_logits[1:kept]  # [n, V]
    p = torch.softmax(full, dim=-1)
    q = torch.softmax(draft_logits, dim=-1)
    drafted = draft_logits.argmax(-1)
    if head.vocab is not None:
        drafted = head.vocab.to(device)[drafted]
        p = p[:, head.vocab.to(device)]  # q is zero outside the draft vocabulary, so only these rows count
    accept = torch.minimum(p, q).sum(-1)  # [n]
    return AnswerScore(
        top1=(drafted == greedy[1:kept]).tolist(),
        accept=accept.tolist(),
        match=(drafted == answer[1:kept]).tolist(),
        greedy_mismatches=mismatches,
        answer_tokens=kept,
    )


def depth_counts(match: list[bool], depth: int) -> tuple[list[int], list[int]]:
    """(hits, trials) for d = 1..depth: drafting from position i matches d consecutive tokens iff match[i..i+d-1]."""
    hits, trials = [0] * depth, [0] * depth
    n = len(match)
    for i in range(n):
        run = 0
        while i + run < n and run < depth and match[i + run]:
            run += 1
        for d in range(1, depth + 1):
            if i + d <= n:
                trials[d - 1] += 1
                hits[d - 1] += d <= run
    return hits, trials


@dataclass
class _Totals:
    answers: int = 0
    answer_tokens: int = 0
    greedy_mismatches: int = 0
    top1: float = 0.0
    accept: float = 0.0
    positions: int = 0
    hits: list[int] = field(default_factory=list)
    trials: list[int] = field(default_factory=list)

    def add(self, score: AnswerScore, depth: int) -> None:
        self.answers += 1
        self.answer_tokens += score.answer_tokens
        self.greedy_mismatches += score.greedy_mismatches
        self.top1 += sum(score.top1)
        self.accept += sum(score.accept)
        self.positions += len(score.top1)
        hits, trials = depth_counts(score.match, depth)
        if not self.hits:
            self.hits, self.trials = [0] * depth, [0] * depth
        self.hits = [a + b for a, b in zip(self.hits, hits, strict=True)]
        self.trials = [a + b for a, b in zip(self.trials, trials, strict=True)]

    def summary(self) -> dict[str, Any]:
        n = max(self.positions, 1)
        agreement = [h / t if t else None for h, t in zip(self.hits, self.trials, strict=True)]
        return {
            "answers": self.answers,
            "answer_tokens": self.answer_tokens,
            "positions": self.positions,
            "top1": self.top1 / n,
            "accept": self.accept / n,
            "depth_agreement": agreement,
            "tau_estimate": 1.0 + sum(a for a in agreement if a is not None),
            "greedy_mismatches": self.greedy_mismatches,
        }


def score_answers(
    base: PreTrainedModel | Backbone,
    adapter: KangarooAdapter,
    answers: list[EvalAnswer],
    depth: int = 4,
    truncate_to_greedy: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Scores of the adapter on every answer, pooled over positions: ``overall`` and per ``categories``.

    Each summary holds answers, answer_tokens, positions (scored), top1, accept (Σ min(p, q)), depth_agreement (for
    d = 1..``depth``), tau_estimate (1 + Σ depth_agreement) and greedy_mismatches.
    """
    check_int("depth", depth, 1, rule="be a positive integer")
    if not answers:
        raise ValueError("No answers to score; give at least one prompt with its answer.")
    backbone = base if isinstance(base, Backbone) else Backbone.of(base)
    head = DraftHead.of(backbone.lm_head, adapter)
    overall, categories = _Totals(), {}
    iterator: Iterable = answers
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(answers, desc="scoring", unit="answer")
    for answer in iterator:
        score = score_answer(backbone, adapter, head, answer.prompt_ids, answer.answer_ids, truncate_to_greedy)
        overall.add(score, depth)
        categories.setdefault(answer.category, _Totals()).add(score, depth)
    if overall.positions == 0 and truncate_to_greedy and any(len(a.answer_ids) >= 2 for a in answers):
        raise ValueError(
            "No answer position to score: none of the answers' tokens is the base's own greedy choice (every answer "
            "diverges from it at once), so they were recorded with another base, dtype or chat template. Pass the "
            "--base (and --dtype) the benchmark used, or drop --answers to let eval-adapter generate the answers."
        )
    if overall.positions == 0:
        raise ValueError(
            "No answer position to score: every answer has fewer than 2 tokens (nothing is drafted from it); raise "
            "max_new_tokens or use other prompts."
        )
    return {
        "overall": overall.summary(),
        "categories": {name: totals.summary() for name, totals in categories.items()},
        "depth": depth,
    }


# ---- answers written by bench -----------------------------------------------------------------------------------


def answers_from_bench(
    path: str | Path, questions: list[Question], tokenizer, eos_token_id: int | None
) -> tuple[list, dict]:
    """The base's greedy answers recorded by ``bench`` (``answers.jsonl``), as token ids, and what was kept.

    A greedy bench (``identical`` true or false; None means it sampled) records vanilla ``generate``'s own answer,
    the base's greedy answer, under ``decoders.vanilla.turns``. Records of bench's earlier schema are converted
    (``bench.records.upgrade_record``); the oldest of them hold vanilla's answer only where ``identical`` is true
    (Kangaroo's output equalled vanilla's). The text (decoded without
    special tokens) is tokenized again and matched to its question by (category, question_id). When the record's
    token count says one token more than the text gives, the answer ended with the end-of-sequence token, which is
    appended. Tokenizing decoded text need not give the original ids:
    score such answers with ``truncate_to_greedy=True``, which keeps the leading tokens the base chooses greedily.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Answers file {str(path)!r} does not exist; pass the answers.jsonl written by bench --out.")
    by_key = {(q.category, q.question_id): q for q in questions}
    answers, counts = [], {"records": 0, "not_greedy": 0, "no_question": 0, "text_round_trip_differs": 0}
    for lineno, line in jsonl_records(path):
        try:
            record = upgrade_record(line)
        except ValueError:
            raise ValueError(
                f"{path}, line {lineno}: not a bench answer record (needs question_id, category, turns, identical)."
            ) from None
        counts["records"] += 1
        vanilla = record["decoders"].get("vanilla", {})
        turns = vanilla.get("turns")
        if vanilla.get("identical") is None or not turns or not isinstance(turns[0], str):  # sampled, or no answer
            counts["not_greedy"] += 1
            continue
        text, new_tokens = turns[0], vanilla.get("new_tokens")
        question = by_key.get((record["category"], record.get("question_id")))
        if question is None:
            counts["no_question"] += 1
            continue
        recorded = record.get("prompt_sha256")  # newer bench versions record which prompt was answered
        if recorded is not None and recorded != hashlib.sha256(question.prompt.encode("utf-8")).hexdigest():
            raise ValueError(
                f"{path}, line {lineno}: question {record.get('question_id')!r} ({record['category']}) was asked with "
                f"another prompt than the questions file's; pass the --questions file the benchmark used."
            )
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if tokenizer.decode(ids, skip_special_tokens=True) != text:
            counts["text_round_trip_differs"] += 1
        if eos_token_id is not None and new_tokens == len(ids) + 1:
            ids = [*ids, eos_token_id]
        prompt = chat_prompt_ids(tokenizer, question.prompt)
        answers.append(EvalAnswer(prompt, ids, question.category, question.question_id))
    counts["used"] = len(answers)
    if not answers:
        raise ValueError(
            f"{path} has no usable answer: of {counts['records']} records, {counts['not_greedy']} hold no greedy "
            f"answer of the base (sampled, or identical false without vanilla_turns) and {counts['no_question']} "
            f"answer no question of the "
            f"questions file (pass the --questions file the benchmark used, with the same --num-questions)."
        )
    return answers, counts


def print_table(result: dict[str, Any], title: str = "on-policy adapter agreement") -> None:
    from rich.console import Console
    from rich.table import Table

    rows = [*result["categories"].items(), ("overall", result["overall"])]
    depth = result["depth"]
    table = Table(title=title)
    table.add_column("category", no_wrap=True, min_width=max(len(name) for name, _ in rows))
    columns = ["answers", "positions", "top-1", "Σ min(p,q)", *(f"depth {d}" for d in range(2, depth + 1)), "τ est."]
    for col in columns:
        table.add_column(col, justify="right")
    for name, r in rows:
        deeper = [f"{a:.3f}" if a is not None else "n/a" for a in r["depth_agreement"][1:]]
        table.add_row(
            name, str(r["answers"]), str(r["positions"]), f"{r['top1']:.3f}", f"{r['accept']:.3f}", *deeper,
            f"{r['tau_estimate']:.2f}",
        )  # fmt: skip
    Console(width=max(100, Console().width)).print(table)


DEFAULT_MAX_NEW_TOKENS = 128
OWNER = "eval-adapter"  # the writer named in its output directory's written list


def run_eval(
    adapter: str | Path,
    base: str | None = None,
    dtype: str | None = None,
    device: str | None = None,
    questions: str | Path | None = None,
    categories: list[str] | None = None,
    num_questions: int | None = None,
    max_new_tokens: int | None = None,
    answers: str | Path | None = None,
    depth: int = 4,
    out: str | Path | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """``eval-adapter``: load base + adapter, get the base's greedy answers (generated, or from a bench
    ``answers.jsonl``), score the adapter on them; optionally write the result as JSON to ``out`` (a new file, one
    eval-adapter wrote, or with ``overwrite`` any file but its inputs; checked before anything loads)."""
    import sys

    from .base import load_tokenizer
    from .model import KangarooModel

    for name, value in (("num_questions", num_questions), ("max_new_tokens", max_new_tokens), ("depth", depth)):
        if value is not None:
            check_int(name, value, 1, rule="be a positive integer")
    if answers is not None and not Path(answers).is_file():
        raise ValueError(f"Answers file {str(answers)!r} does not exist; pass the answers.jsonl bench wrote.")
    path = questions if questions is not None else default_questions()
    if out is not None:
        check_file_target(out, OWNER, overwrite=overwrite, inputs=(path, answers), fix="pass --overwrite to replace it")
    selected = load_questions(path, categories, num_questions)
    km = KangarooModel.from_pretrained(base, adapter=adapter, dtype=dtype, device=device)
    tokenizer = load_tokenizer(km.base)
    source: dict[str, Any]
    if answers is not None:
        eos = km.base.generation_config.eos_token_id
        eos = eos[0] if isinstance(eos, list) else eos
        evaluated, counts = answers_from_bench(answers, selected, tokenizer, eos)
        if max_new_tokens is not None:
            for a in evaluated:
                a.answer_ids = a.answer_ids[:max_new_tokens]
        source = {"answers_file": str(answers), **counts}
    else:
        limit = max_new_tokens if max_new_tokens is not None else DEFAULT_MAX_NEW_TOKENS
        prompts = [chat_prompt_ids(tokenizer, q.prompt) for q in selected]
        generated = greedy_answers(km.base, prompts, limit, progress=progress)
        evaluated = [
            EvalAnswer(p, a, q.category, q.question_id) for p, a, q in zip(prompts, generated, selected, strict=True)
        ]
        source = {"generated": len(evaluated), "max_new_tokens": limit}
    result = score_answers(
        km.backbone, km.adapter, evaluated, depth=depth, truncate_to_greedy=answers is not None, progress=progress
    )
    if answers is not None:
        total = sum(len(a.answer_ids) for a in evaluated)
        kept = result["overall"]["answer_tokens"]
        source["answer_tokens_kept"] = kept
        source["answer_tokens_total"] = total
        print(
            f"[eval-adapter] {counts['used']} of {counts['records']} records used ({counts['not_greedy']} without the "
            f"base's greedy answer, {counts['no_question']} without their question); re-tokenized text: {kept} of "
            f"{total} answer tokens are the base's greedy continuation and were scored "
            f"({counts['text_round_trip_differs']} texts do not decode back identically)",
            file=sys.stderr,
        )
    result["config"] = {
        "adapter": str(adapter),
        "base_model": km.base.config.name_or_path,
        "exit_layer": km.exit_layer,
        "draft_vocab_size": km.adapter.config.draft_vocab_size,
        "dtype": str(km.base.dtype).removeprefix("torch."),
        "dtype_reason": km.dtype_reason,
        "questions": str(path),
        "num_questions": num_questions,
        **source,
    }
    if out is not None:
        write_file(out, json.dumps(result, indent=2) + "\n", OWNER, overwrite=overwrite)
    return result
