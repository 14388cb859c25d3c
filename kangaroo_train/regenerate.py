"""The base's own answers to a conversation's user turns: what the distill stage writes to ``distill.dir``.

Why: the adapter drafts for the base, so what it must predict is the base's own continuation. ShareGPT's replies were
written by another model (off-policy); EAGLE-3 and Medusa-2 train their drafters on answers the target regenerated
itself. Here the user turns (and a leading system prompt) are kept and each assistant turn is replaced by the base's
answer to the REGENERATED history, rendered with the base's chat template (``add_generation_prompt=True``), ending at
the base's EOS (from its generation config). Greedy by default; ``temperature`` > 0 samples (with ``top_p``), each
answer from its own generator seeded by (seed, conversation, turn), so a conversation's answers do not depend on which
other conversations share its batch.

Batching: turn t of every conversation of a shard is generated together (all first answers, then all second answers
with their regenerated histories, ...), prompts sorted by length and left-padded with an attention mask. The decoder
is Hugging Face's batched ``generate(do_sample=False)``, not ``KangarooModel.generate`` with a batch: no adapter exists
at this stage (distillation makes its training data), so Kangaroo's batched decoding could only run the base alone,
which is ``generate`` with extra bookkeeping; and ``generate(do_sample=False)`` is the very decoder that losslessness is
defined against, so the data are exactly the answers a lossless Kangaroo model reproduces. Per-row stops (EOS, or the
row's own token budget) come from ``generate``'s stopping criteria; sampling uses a logits processor that draws each
row's token with that row's generator and leaves ``generate`` to pick it greedily.

Turns are cut to what training keeps: ``max_len`` (``data.max_len`` by default) bounds prompt + answer, so an answer
stops where tokenization would cut it anyway, and a conversation ends at an answer cut that way. An answer cut at
``max_new_tokens`` is kept and the conversation goes on. An empty answer (EOS first) ends its conversation before that
turn; a conversation left without answers is dropped.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)

from kangaroo_infer.packed import packed_linears

from .checks import require_number, require_positive_int
from .data import Conversation, render

log = logging.getLogger("kangaroo_train")

EMPTY_PROMPT_ACTIONS = ("error", "truncate")
STAT_KEYS = (
    "conversations",  # conversations written (with at least one answer)
    "answers",  # assistant turns regenerated and kept
    "answer_tokens",  # tokens of those answers (without EOS)
    "cut_max_new_tokens",  # answers that reached max_new_tokens without EOS (kept)
    "cut_max_len",  # answers that reached max_len with their prompt (kept; the conversation ends there)
    "empty_answers",  # answers that were empty (dropped with the rest of their conversation)
    "turns_beyond_max_len",  # turns not generated: their prompt alone reaches max_len, or an earlier answer did
    "turns_after_empty",  # turns not generated after an empty answer
    "dropped_empty",  # conversations whose first answer was empty: nothing left to train on
    "dropped_max_len",  # conversations whose first prompt already reaches max_len
)


# ----------------------------------------------------------------------------------------------------------------
# Settings and prompts
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistillSettings:
    """How answers are generated (the parts of ``distill.*`` that decide the text)."""

    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    max_new_tokens: int = 512
    max_len: int | None = None  # prompt + answer tokens; None = no bound besides max_new_tokens
    batch_size: int = 8

    def __post_init__(self) -> None:
        require_number("distill.temperature", self.temperature, 0)  # NaN refused: it would silently run greedy
        require_number("distill.top_p", self.top_p, 0, 1, low_open=True)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"distill.seed={self.seed!r} must be an integer.")
        require_positive_int("distill.max_new_tokens", self.max_new_tokens)
        require_positive_int("distill.max_len", self.max_len, optional=True)
        require_positive_int("distill.batch_size", self.batch_size)

    @property
    def sampled(self) -> bool:
        return self.temperature > 0

    def identity(self) -> dict[str, Any]:
        """What the answers depend on (batch size does not: rows are independent; seed only when sampling)."""
        decoding = {"temperature": float(self.temperature), "top_p": float(self.top_p), "seed": self.seed}
        return {
            "decoding": decoding if self.sampled else "greedy",
            "max_new_tokens": self.max_new_tokens,
            "max_len": self.max_len,
        }


@dataclass
class Prompts:
    """The conversations to distill, reduced to what the base answers: each conversation's messages without the
    assistant turns (a system prompt and user turns), plus what was dropped on the way."""

    skeletons: list[Conversation]  # messages without assistant turns; every user message gets a fresh answer
    source_indices: list[int]  # position of each in the source
    originals: list[Conversation]  # the source conversations as loaded (for mix_original)
    dropped_no_user: int = 0  # conversations without a user turn (dropped, counted)
    dropped_no_reply: int = 0  # records of data.source with a user turn but no assistant reply (dropped on loading)
    truncated_empty: int = 0  # conversations cut before an empty user turn (distill.empty_prompts=truncate)


def prompts_from_conversations(conversations: list[Conversation], empty_prompts: str = "error") -> Prompts:
    """Strip the assistant turns. A conversation without a user turn is dropped and counted (an error when none has
    one); an empty user turn is an error naming the conversation, or with ``empty_prompts="truncate"`` cuts the
    conversation before it."""
    if empty_prompts not in EMPTY_PROMPT_ACTIONS:
        raise ValueError(f"distill.empty_prompts={empty_prompts!r} must be one of {list(EMPTY_PROMPT_ACTIONS)}.")
    prompts = Prompts([], [], [])
    for index, conversation in enumerate(conversations):
        skeleton: Conversation = []
        for turn, message in enumerate(conversation):
            if message["role"] == "assistant":
                continue
            if message["role"] == "user" and not message["content"].strip():
                if empty_prompts == "error":
                    raise ValueError(
                        f"Conversation {index} of the data to distill has an empty user turn (message {turn}): the "
                        f"base would answer nothing in particular. Remove that turn or conversation from the data, or "
                        f"set distill.empty_prompts=truncate to cut such conversations before their empty turn."
                    )
                prompts.truncated_empty += 1
                break
            skeleton.append({"role": message["role"], "content": message["content"]})
        while skeleton and skeleton[-1]["role"] != "user":  # a trailing system message prompts nothing
            skeleton.pop()
        if not any(message["role"] == "user" for message in skeleton):
            prompts.dropped_no_user += 1
            continue
        prompts.skeletons.append(skeleton)
        prompts.source_indices.append(index)
        prompts.originals.append(conversation)
    if not prompts.skeletons:
        raise ValueError(
            f"None of the {len(conversations)} conversations to distill has a (non-empty) user turn, so there is "
            f"nothing to ask the base. Point data.source at conversations with user messages."
        )
    if prompts.dropped_no_user:
        log.warning("distill: dropped %d conversations without a user turn", prompts.dropped_no_user)
    if prompts.truncated_empty:
        log.warning("distill: cut %d conversations before an empty user turn", prompts.truncated_empty)
    return prompts


def check_chat_template(tokenizer: PreTrainedTokenizerBase, base_name: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"The tokenizer of the base {base_name!r} has no chat template, so distill cannot render prompts the way "
            f"the base answers them. Use a chat/instruct base, add a chat template to its directory "
            f"(chat_template.jinja or tokenizer_config.json's chat_template), or train on the replies in data.source "
            f"with distill=none."
        )


def stop_token_ids(generation_eos: int | list[int] | None, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The base's end-of-sequence ids: its generation config's, else the tokenizer's."""
    eos = generation_eos if generation_eos is not None else tokenizer.eos_token_id
    if eos is None:
        raise ValueError(
            "The base defines no end-of-sequence token (generation_config.json eos_token_id, or the tokenizer's "
            "eos_token), so its answers would never end; set eos_token_id in the base's generation_config.json."
        )
    return [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]


# ----------------------------------------------------------------------------------------------------------------
# Batched generation
# ----------------------------------------------------------------------------------------------------------------


class _RowBudget(StoppingCriteria):
    """Stops each row after its own number of new tokens (``generate``'s max_new_tokens is one number per call)."""

    def __init__(self, prompt_length: int, budgets: list[int]) -> None:
        self.prompt_length = prompt_length
        self.budgets = torch.tensor(budgets)  # [B]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor | None, **kwargs: Any) -> torch.Tensor:
        generated = input_ids.shape[1] - self.prompt_length
        return (generated >= self.budgets).to(input_ids.device)  # [B] bool


class _RowSampler(LogitsProcessor):
    """Draws each row's next token with the row's own generator (temperature, then top-p) and returns scores that
    are -inf everywhere else, so ``generate(do_sample=False)`` takes exactly that token."""

    def __init__(self, generators: list[torch.Generator], temperature: float, top_p: float) -> None:
        self.generators = generators
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:  # scores [B, V]
        probs = torch.softmax(scores.float() / self.temperature, dim=-1).cpu()  # [B, V]
        if self.top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= self.top_p  # mass before a token already >= p
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        picked = torch.cat([torch.multinomial(probs[b], 1, generator=g) for b, g in enumerate(self.generators)])
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(out.shape[0], device=out.device), picked.to(out.device)] = 0.0
        return out


def answer_generator(seed: int, conversation: int, turn: int) -> torch.Generator:
    """The generator of one sampled answer: the same answer whatever batch it is drawn in."""
    digest = hashlib.sha256(f"kangaroo-distill:{seed}:{conversation}:{turn}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def generate_answers(
    base: PreTrainedModel,
    prompts: list[list[int]],
    budgets: list[int],
    eos: list[int],
    pad: int,
    generators: list[torch.Generator] | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> list[tuple[list[int], bool]]:
    """One batched ``generate`` call over left-padded prompts: (answer ids without EOS, ended at EOS) per prompt,
    row b stopping at EOS or after ``budgets[b]`` new tokens. Greedy unless ``generators`` are given."""
    if len(prompts) != len(budgets) or not prompts:
        raise ValueError(f"generate_answers needs one budget per prompt (got {len(prompts)} / {len(budgets)}).")
    length = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), length), pad, dtype=torch.long)  # [B, T]
    attention_mask = torch.zeros_like(input_ids)  # [B, T], 0 on the left padding
    for row, prompt in enumerate(prompts):
        input_ids[row, length - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, length - len(prompt) :] = 1
    processors = LogitsProcessorList()
    if generators is not None:
        processors.append(_RowSampler(generators, temperature, top_p))
    with torch.no_grad(), packed_linears(base):  # bit-equal to the unpacked linears, faster in bf16 on CPU
        out = base.generate(
            input_ids.to(base.device),
            attention_mask=attention_mask.to(base.device),
            do_sample=False,
            max_new_tokens=max(budgets),
            eos_token_id=eos,
            pad_token_id=pad,
            stopping_criteria=StoppingCriteriaList([_RowBudget(length, budgets)]),
            logits_processor=processors,
        )  # [B, T + new]
    answers = []
    for row, budget in enumerate(budgets):
        new = out[row, length : length + budget].tolist()
        end = next((i for i, token in enumerate(new) if token in eos), None)
        answers.append((new, False) if end is None else (new[:end], True))
    return answers


@dataclass
class DistilledConversation:
    source_index: int
    messages: Conversation  # the skeleton's messages with fresh answers; empty when nothing was kept
    stats: Counter = field(default_factory=Counter)


def distill_conversations(
    base: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    skeletons: list[Conversation],
    source_indices: list[int],
    settings: DistillSettings,
    eos: list[int],
    on_answers: Callable[[int, int, int], None] | None = None,
) -> list[DistilledConversation]:
    """Answer every user turn of ``skeletons`` with the base, turn index by turn index, each answer conditioned on
    the conversation's regenerated history. ``on_answers(answers, tokens, dropped)`` reports progress after each
    batch: answers generated, their tokens, and user turns that will never be answered (beyond max_len, after an
    empty answer) found since the last report."""
    check_chat_template(tokenizer, tokenizer.name_or_path)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    results = [DistilledConversation(index, []) for index in source_indices]
    # per conversation: the messages still to process, and whether it is still going
    pending = [list(skeleton) for skeleton in skeletons]
    active = [True] * len(skeletons)
    reported_dropped = 0

    def report(answers: int, tokens: int) -> None:
        nonlocal reported_dropped
        dropped = sum(r.stats["turns_beyond_max_len"] + r.stats["turns_after_empty"] for r in results)
        if on_answers is not None and (answers or dropped != reported_dropped):
            on_answers(answers, tokens, dropped - reported_dropped)
        reported_dropped = dropped

    turn = 0
    while True:
        ready: list[tuple[int, list[int], int]] = []  # (conversation, prompt ids, budget)
        for c, result in enumerate(results):
            if not active[c]:
                continue
            while pending[c] and pending[c][0]["role"] != "user":  # system prompts pass through
                result.messages.append(pending[c].pop(0))
            if not pending[c]:
                active[c] = False
                continue
            prompt = _prompt_ids(tokenizer, [*result.messages, pending[c][0]])
            budget = settings.max_new_tokens
            if settings.max_len is not None:
                budget = min(budget, settings.max_len - len(prompt))
            if budget < 1:
                _finish(result, pending[c], "turns_beyond_max_len")
                active[c] = False
                continue
            ready.append((c, prompt, budget))
        if not ready:
            break
        ready.sort(key=lambda item: len(item[1]))  # similar lengths per batch: less padding
        for start in range(0, len(ready), settings.batch_size):
            batch = ready[start : start + settings.batch_size]
            generators = (
                [answer_generator(settings.seed, source_indices[c], turn) for c, _, _ in batch]
                if settings.sampled
                else None
            )
            answers = generate_answers(
                base,
                [prompt for _, prompt, _ in batch],
                [budget for _, _, budget in batch],
                eos,
                pad,
                generators,
                settings.temperature,
                settings.top_p,
            )
            for (c, _, budget), (ids, ended) in zip(batch, answers, strict=True):
                active[c] = _add_answer(results[c], pending[c], tokenizer, ids, ended, budget, settings)
            report(len(batch), sum(len(ids) for ids, _ in answers))
        turn += 1
    report(0, 0)  # turns dropped when the last prompts were found beyond max_len
    for result in results:
        if not any(m["role"] == "assistant" for m in result.messages):
            result.messages = []
    return results


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: Conversation) -> list[int]:
    text = render(tokenizer, messages, generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _add_answer(
    result: DistilledConversation,
    pending: Conversation,
    tokenizer: PreTrainedTokenizerBase,
    ids: list[int],
    ended: bool,
    budget: int,
    settings: DistillSettings,
) -> bool:
    """Append one answer to its conversation; False when the conversation ends with it."""
    text = tokenizer.decode(ids, skip_special_tokens=False)
    if not text.strip():
        result.stats["empty_answers"] += 1
        had_answers = any(m["role"] == "assistant" for m in result.messages)
        _finish(result, pending, "turns_after_empty", skip_first=True)
        if not had_answers:
            result.stats["dropped_empty"] += 1
        return False
    result.messages += [pending.pop(0), {"role": "assistant", "content": text}]
    result.stats["answers"] += 1
    result.stats["answer_tokens"] += len(ids)
    if ended:
        return True
    if budget < settings.max_new_tokens:  # the max_len bound cut it: later turns would be cut away entirely
        result.stats["cut_max_len"] += 1
        _finish(result, pending, "turns_beyond_max_len")
        return False
    result.stats["cut_max_new_tokens"] += 1
    return True


def _finish(result: DistilledConversation, pending: Conversation, reason: str, skip_first: bool = False) -> None:
    """End a conversation early, counting the user turns left unanswered."""
    left = sum(m["role"] == "user" for m in pending) - int(skip_first)
    result.stats[reason] += left
    if reason == "turns_beyond_max_len" and not any(m["role"] == "assistant" for m in result.messages):
        result.stats["dropped_max_len"] += 1
    pending.clear()
