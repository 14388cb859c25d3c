"""The decoding loop, one for a prompt and for a batch: every round has one shape, whatever drafts and however it
samples.

    offers       = rows.offer(limits)              # what each drafter could propose now, by name, per row
    name, k      = scheduler.choose(offers, ids)   # (PLAIN, 0): a plain step; ids: a batch's rows
    rows.propose(name, k, last)                    # the drafter's proposal (tokens, + q sampled, + a tree)
    result       = rows.verify()                   # the deep layers once over it, the acceptance rule, the rollback
    committed    = cut_at_eos(result.tokens[row]); rows.observe(row, committed)   # each row; drafters hear it too
    rows.keep(still_running)                       # finished rows leave (a batch realigns its caches)
    scheduler.observe_rows(name, steps, outcomes, costs, ids)   # costs: drafting; the rest, keep included

``rows`` is the engine behind the loop: ``PromptRows`` (here) for one prompt, whose drafters are the adapter's chain
(``draft.AdapterChain``) or tree (``tree.AdapterTree``) and prompt lookup (``lookup.Lookup``), verified by
``verify.Verifier``; ``batch.BatchRows`` for a left-padded batch (lockstep adapter drafts, per-row lookup, per-row
cache realignment). The scheduler, the acceptance rule and the EOS cut are the same for both.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import torch

from .accept import accept_proposal, cut_at_eos
from .cache import KangarooCache
from .draft import AdapterChain, DraftPick
from .lookup import Lookup
from .outputs import GenerateOutput
from .proposal import LOOKUP, Drafter, NoDraft, Proposal
from .sample import draw, process
from .scheduler import PLAIN, Scheduler
from .settings import GenerationSettings
from .tree import AdapterTree
from .verify import Verifier


@dataclass
class RoundResult:
    """What a round verified and kept, per active row."""

    steps: int  # draft steps the round took (a chain's length, a tree's depth; a batch: the lockstep width)
    verified: int  # tokens it verified per row after the last committed one
    outcomes: list[tuple[int, int]]  # per row: (draft steps that counted, of them accepted), for the scheduler
    drafted: list[int]  # per row: draft tokens that counted (a tree: its nodes)
    tokens: list[list[int]]  # per row: accepted drafts + the full model's next token (before the EOS cut)


class Rows(Protocol):
    """The engine the loop drives: one prompt or a batch of them."""

    input_ids: torch.Tensor  # [B, T] the prompts (a batch: left-padded), on the model's device

    @property
    def scheduler_drafters(self) -> tuple[dict[str, bool], dict[str, tuple[int, int]] | None]: ...  # free, fanout
    def prefill(self) -> torch.Tensor: ...  # logits after each prompt [B, V]
    def offer(self, limits: list[int]) -> dict[str, list[int]]: ...  # limits, offers: per active row
    def propose(self, name: str | None, k: int, last: list[int], limits: list[int]) -> None: ...
    def verify(self) -> RoundResult: ...
    def observe(self, row: int, committed: list[int]) -> None: ...  # row: index among the active rows
    def keep(self, still: list[int], result: RoundResult | None) -> None: ...  # active rows still running, in order
    def sequences(self, new_tokens: list[list[int]]) -> torch.Tensor: ...  # prompts + each row's new tokens [B, T']


def first_token(logits: torch.Tensor, settings: GenerationSettings, generator) -> torch.Tensor:  # [B, V] -> [B]
    """The prefill's token: the argmax, or a draw from the processed distribution."""
    if settings.sampling.greedy:
        return logits.argmax(dim=-1)
    return draw(process(logits, settings.sampling), generator)


def make_drafters(km, prompt: list[int], settings: GenerationSettings, cache: KangarooCache, generator):
    """The drafters one prompt's rounds choose from, by name."""
    s, backbone = settings, km.backbone
    if s.tree:
        adapter = AdapterTree(
            backbone, km.adapter, km.draft_head, cache, s.max_draft_steps, s.tree_top_k, s.tree_max_nodes,
            s.threshold, s.eos_ids,
        )  # fmt: skip
    else:
        pick = DraftPick(km.draft_head, s.sampling, backbone.lm_head.weight.shape[0], generator)
        adapter = AdapterChain(backbone, km.adapter, pick, cache, s.max_draft_steps, s.threshold, s.eos_ids)
    drafters: list[Drafter] = [adapter]
    if s.lookup_tokens:
        drafters.append(Lookup(prompt, s.lookup_tokens, s.lookup_min_ngram, s.lookup_max_ngram))
    return {d.name: d for d in drafters}


class PromptRows:
    """One prompt under the loop: its caches, its drafters, the verifier."""

    def __init__(self, km, input_ids: torch.Tensor, settings: GenerationSettings, generator):  # input_ids [1, T]
        device = km.backbone.embed_tokens.weight.device
        self.km, self.settings, self.generator = km, settings, generator
        self.input_ids = input_ids.to(device=device, dtype=torch.long)
        self.cache = KangarooCache(km.exit_layer, km.backbone.num_layers)
        self.verifier = Verifier(km.backbone, km.exit_layer, self.cache)
        self.drafters = make_drafters(km, input_ids[0].tolist(), settings, self.cache, generator)
        self.plain = NoDraft()
        self.proposal, self.last = Proposal([]), 0

    @property
    def scheduler_drafters(self) -> tuple[dict[str, bool], dict[str, tuple[int, int]] | None]:
        fanout = {name: d.fanout for name, d in self.drafters.items() if d.fanout is not None}
        return {name: d.free for name, d in self.drafters.items()}, fanout or None

    def prefill(self) -> torch.Tensor:  # [1, V]
        return self.km.prefill(self.input_ids, self.cache)[None]

    def offer(self, limits: list[int]) -> dict[str, list[int]]:
        return {name: [drafter.offer(limits[0])] for name, drafter in self.drafters.items()}

    def propose(self, name: str | None, k: int, last: list[int], limits: list[int]) -> None:
        self.last = last[0]
        self.proposal = self.drafters.get(name, self.plain).propose(last[0], k)

    def verify(self) -> RoundResult:
        proposal = self.proposal
        logits = self.verifier.logits(self.last, proposal)  # [k + 1, V]
        path, next_token = accept_proposal(proposal, logits, self.settings.sampling, self.generator)
        self.verifier.keep(path)
        tokens = [proposal.tokens[node - 1] for node in path[1:]] + [next_token]
        drafted = len(proposal.tokens)
        return RoundResult(proposal.steps, drafted, [(proposal.steps, len(path) - 1)], [drafted], [tokens])

    def observe(self, row: int, committed: list[int]) -> None:
        for drafter in self.drafters.values():
            drafter.observe(committed)

    def keep(self, still: list[int], result: RoundResult | None) -> None:
        pass  # the verifier has rolled the caches back already

    def sequences(self, new_tokens: list[list[int]]) -> torch.Tensor:  # [1, T + n]
        return torch.cat([self.input_ids, self.input_ids.new_tensor(new_tokens)], dim=1)


def decode(rows: Rows, settings: GenerationSettings, generator, batched: bool, streamer=None) -> GenerateOutput:
    """The round loop over ``rows`` (prompts already validated). A batch's outputs are per row; rows finish on their
    own (EOS or max_new_tokens) and leave the batch."""
    s = settings
    timed = s.sampling.greedy  # a timing-driven schedule would make a seed's output depend on the machine's load
    free, fanout = rows.scheduler_drafters
    scheduler = Scheduler.create(s.policy, free, timed=timed, fanout=fanout)

    if streamer is not None:
        streamer.put(rows.input_ids.cpu())
    t0 = time.perf_counter()
    first = first_token(rows.prefill(), s, generator).tolist()  # [B]
    t1 = time.perf_counter()
    batch = len(first)
    new_tokens = [[token] for token in first]
    accept_lengths: list[list[int]] = [[1] for _ in range(batch)]
    draft_lengths: list[list[int]] = [[] for _ in range(batch)]
    lookup_rounds: list[list[int]] = [[] for _ in range(batch)]
    for row, tokens in enumerate(new_tokens):
        rows.observe(row, tokens)
    if streamer is not None:
        streamer.put(torch.tensor(first))

    def running(row: int) -> bool:
        return new_tokens[row][-1] not in s.eos_ids and len(new_tokens[row]) < s.max_new_tokens

    active = [row for row in range(batch) if running(row)]  # original index of each row still decoding
    if 0 < len(active) < batch:
        rows.keep(active, None)
    while active:
        limits = [s.max_new_tokens - len(new_tokens[row]) - 1 for row in active]  # most drafts each row may take
        start = time.perf_counter()
        ids = active if batched else None  # a batch's rows are priced at their own acceptance
        name, k = scheduler.choose(rows.offer(limits), ids)
        rows.propose(name, k, [new_tokens[row][-1] for row in active], limits)
        drafted_at = time.perf_counter()
        result = rows.verify()
        for i, row in enumerate(active):
            committed = cut_at_eos(result.tokens[i], s.eos_ids)
            new_tokens[row].extend(committed)
            rows.observe(i, committed)
            if name == LOOKUP and result.drafted[i]:
                lookup_rounds[row].append(len(draft_lengths[row]))
            accept_lengths[row].append(len(committed))
            draft_lengths[row].append(result.drafted[i])
            if streamer is not None:
                streamer.put(torch.tensor(committed))
        still = [i for i, row in enumerate(active) if running(row)]
        if still:
            rows.keep(still, result)  # a batch's realignment is part of what the round cost
        if timed:
            costs = drafted_at - start, time.perf_counter() - drafted_at
        else:
            costs = scheduler.nominal_costs(name, result.steps, result.verified)
        done = name if result.steps else PLAIN
        scheduler.observe_rows(done, result.steps, result.outcomes, *costs, result.verified, ids)
        active = [active[i] for i in still]
    if streamer is not None:
        streamer.end()
    elapsed = time.perf_counter() - t1
    sequences = rows.sequences(new_tokens)
    if not batched:
        return GenerateOutput(sequences, accept_lengths[0], draft_lengths[0], t1 - t0, elapsed, lookup_rounds[0])
    return GenerateOutput(sequences, accept_lengths, draft_lengths, t1 - t0, elapsed, lookup_rounds)
