"""The decoding loop of one prompt: every round has one shape, whatever drafts and however it samples.

    drafter, k   = scheduler.choose(offers)        # adapter chain or tree, lookup copy, or (None, 0): a plain step
    proposal     = propose(drafter, k)             # tokens (+ q for sampled drafts, + the tree for a tree)
    logits       = verifier.logits(proposal)       # the deep layers once over last token + proposal   [k + 1, V]
    path, next   = accept(proposal, logits)        # greedy = the one-hot case of the sampling rule
    verifier.keep(path)                            # every cache rolled back to (or gathered at) the kept tokens
    committed    = cut_at_eos(proposal[path] + [next])
    scheduler.observe(drafter, k, n, costs)
"""

from __future__ import annotations

import time

import torch

from .accept import accept_proposal, cut_at_eos
from .cache import KangarooCache
from .draft import DraftPick, Proposal, draft_proposal
from .lookup import NgramLookup
from .outputs import GenerateOutput
from .sample import draw, make_generator, process
from .scheduler import PLAIN, Scheduler
from .settings import GenerationSettings
from .tree import draft_tree
from .verify import Verifier

ADAPTER, LOOKUP = "adapter", "lookup"
DRAFTERS = {ADAPTER: False, LOOKUP: True}  # name -> drafts cost nothing to make


def first_token(logits: torch.Tensor, settings: GenerationSettings, generator) -> torch.Tensor:  # [B, V] -> [B]
    """The prefill's token: the argmax, or a draw from the processed distribution."""
    if settings.sampling.greedy:
        return logits.argmax(dim=-1)
    return draw(process(logits, settings.sampling), generator)


def decode(km, input_ids: torch.Tensor, settings: GenerationSettings, streamer=None) -> GenerateOutput:
    """Decode one prompt ([1, T], already validated) with a ``KangarooModel``."""
    s = settings
    backbone, adapter, ell = km.backbone, km.adapter, km.exit_layer
    device = backbone.embed_tokens.weight.device
    input_ids = input_ids.to(device=device, dtype=torch.long)
    generator = None if s.sampling.greedy else make_generator(s.seed, device)
    pick = DraftPick(km.draft_head, s.sampling, backbone.lm_head.weight.shape[0], generator)
    cache = KangarooCache(ell, backbone.num_layers)
    verifier = Verifier(backbone, ell, cache)
    copier = NgramLookup(input_ids[0].tolist(), s.lookup_min_ngram, s.lookup_max_ngram) if s.lookup_tokens else None
    timed = s.sampling.greedy  # a timing-driven schedule would make a seed's output depend on the machine's load
    fanout = {ADAPTER: (s.tree_top_k, s.tree_max_nodes)} if s.tree else None  # a tree verifies up to K per level
    scheduler = Scheduler.create(s.policy, DRAFTERS, timed=timed, fanout=fanout)
    if streamer is not None:
        streamer.put(input_ids.cpu())

    t0 = time.perf_counter()
    new_tokens = first_token(km.prefill(input_ids, cache)[None], s, generator).tolist()
    t1 = time.perf_counter()
    if copier is not None:
        copier.extend(new_tokens)
    accept_lengths, draft_lengths, lookup_rounds = [1], [], []
    if streamer is not None:
        streamer.put(torch.tensor(new_tokens))
    while len(new_tokens) < s.max_new_tokens and new_tokens[-1] not in s.eos_ids:
        remaining, last = s.max_new_tokens - len(new_tokens), new_tokens[-1]
        offers = {ADAPTER: min(s.max_draft_steps, remaining - 1)}
        copied = copier.propose(min(s.lookup_tokens, remaining - 1)) if copier is not None else []
        if copied:
            offers[LOOKUP] = len(copied)
        start = time.perf_counter()
        drafter, k = scheduler.choose(offers)
        if drafter == LOOKUP:
            lookup_rounds.append(len(draft_lengths))
            proposal = Proposal(copied[:k], copied=True)
        elif drafter == ADAPTER and s.tree:
            proposal = draft_tree(
                backbone, adapter, km.draft_head, cache, last, k, s.tree_top_k, s.tree_max_nodes, s.threshold,
                s.eos_ids,
            )  # fmt: skip
        elif drafter == ADAPTER:
            proposal = draft_proposal(backbone, adapter, pick, cache, last, k, s.threshold, s.eos_ids)
        else:
            proposal = Proposal([])
        drafted_at = time.perf_counter()
        logits = verifier.logits(last, proposal)  # [k + 1, V]
        path, next_token = accept_proposal(proposal, logits, s.sampling, generator)
        verifier.keep(path)
        committed = [proposal.tokens[node - 1] for node in path[1:]] + [next_token]
        drafted = len(proposal.tokens)
        depth = max(proposal.tree.depths) if proposal.tree is not None else drafted  # draft steps taken
        if timed:
            costs = drafted_at - start, time.perf_counter() - drafted_at
        else:
            costs = scheduler.nominal_costs(drafter, depth, drafted)
        scheduler.observe(drafter if depth else PLAIN, depth, len(path) - 1, *costs, verified=drafted)
        committed = cut_at_eos(committed, s.eos_ids)
        new_tokens.extend(committed)
        if copier is not None:
            copier.extend(committed)
        accept_lengths.append(len(committed))
        draft_lengths.append(drafted)
        if streamer is not None:
            streamer.put(torch.tensor(committed))
    if streamer is not None:
        streamer.end()
    sequences = torch.cat([input_ids, torch.tensor([new_tokens], device=device)], dim=1)
    return GenerateOutput(sequences, accept_lengths, draft_lengths, t1 - t0, time.perf_counter() - t1, lookup_rounds)
