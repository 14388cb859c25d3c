"""The decoding loop of one prompt: every round has one shape, whatever drafts and however it samples.

    name, k      = scheduler.choose(offers)        # offers: each drafter's ``offer``; (PLAIN, 0): a plain step
    proposal     = drafters[name].propose(last, k) # tokens (+ q for sampled drafts, + the tree for a tree)
    logits       = verifier.logits(proposal)       # the deep layers once over last token + proposal   [k + 1, V]
    path, next   = accept(proposal, logits)        # greedy = the one-hot case of the sampling rule
    verifier.keep(path)                            # every cache rolled back to (or gathered at) the kept tokens
    committed    = cut_at_eos(proposal[path] + [next])
    scheduler.observe(name, k, n, costs); each drafter observes ``committed``

The drafters (``proposal.Drafter``): the adapter's chain (``draft.AdapterChain``) or tree (``tree.AdapterTree``),
prompt lookup (``lookup.Lookup``), and the plain step (``proposal.NoDraft``).
"""

from __future__ import annotations

import time

import torch

from .accept import accept_proposal, cut_at_eos
from .cache import KangarooCache
from .draft import AdapterChain, DraftPick
from .lookup import Lookup
from .outputs import GenerateOutput
from .proposal import Drafter, NoDraft
from .sample import draw, make_generator, process
from .scheduler import PLAIN, Scheduler
from .settings import GenerationSettings
from .tree import AdapterTree
from .verify import Verifier


def first_token(logits: torch.Tensor, settings: GenerationSettings, generator) -> torch.Tensor:  # [B, V] -> [B]
    """The prefill's token: the argmax, or a draw from the processed distribution."""
    if settings.sampling.greedy:
        return logits.argmax(dim=-1)
    return draw(process(logits, settings.sampling), generator)


def make_drafters(km, input_ids: torch.Tensor, settings: GenerationSettings, cache: KangarooCache, generator):
    """The drafters one prompt's rounds choose from (by name), and the plain step."""
    s, backbone = settings, km.backbone
    drafters: list[Drafter] = []
    if s.tree:
        adapter = AdapterTree(
            backbone, km.adapter, km.draft_head, cache, s.max_draft_steps, s.tree_top_k, s.tree_max_nodes,
            s.threshold, s.eos_ids,
        )  # fmt: skip
    else:
        pick = DraftPick(km.draft_head, s.sampling, backbone.lm_head.weight.shape[0], generator)
        adapter = AdapterChain(backbone, km.adapter, pick, cache, s.max_draft_steps, s.threshold, s.eos_ids)
    drafters.append(adapter)
    if s.lookup_tokens:
        drafters.append(Lookup(input_ids[0].tolist(), s.lookup_tokens, s.lookup_min_ngram, s.lookup_max_ngram))
    return {d.name: d for d in drafters}


def decode(km, input_ids: torch.Tensor, settings: GenerationSettings, streamer=None) -> GenerateOutput:
    """Decode one prompt ([1, T], already validated) with a ``KangarooModel``."""
    s = settings
    backbone = km.backbone
    device = backbone.embed_tokens.weight.device
    input_ids = input_ids.to(device=device, dtype=torch.long)
    generator = None if s.sampling.greedy else make_generator(s.seed, device)
    cache = KangarooCache(km.exit_layer, backbone.num_layers)
    verifier = Verifier(backbone, km.exit_layer, cache)
    drafters = make_drafters(km, input_ids, s, cache, generator)
    plain = NoDraft()
    timed = s.sampling.greedy  # a timing-driven schedule would make a seed's output depend on the machine's load
    fanout = {name: d.fanout for name, d in drafters.items() if d.fanout is not None}
    free = {name: d.free for name, d in drafters.items()}
    scheduler = Scheduler.create(s.policy, free, timed=timed, fanout=fanout or None)
    if streamer is not None:
        streamer.put(input_ids.cpu())

    t0 = time.perf_counter()
    new_tokens = first_token(km.prefill(input_ids, cache)[None], s, generator).tolist()
    t1 = time.perf_counter()
    for drafter in drafters.values():
        drafter.observe(new_tokens)
    accept_lengths, draft_lengths, lookup_rounds = [1], [], []
    if streamer is not None:
        streamer.put(torch.tensor(new_tokens))
    while len(new_tokens) < s.max_new_tokens and new_tokens[-1] not in s.eos_ids:
        remaining, last = s.max_new_tokens - len(new_tokens), new_tokens[-1]
        offers = {name: drafter.offer(remaining - 1) for name, drafter in drafters.items()}
        start = time.perf_counter()
        name, k = scheduler.choose(offers)
        proposal = drafters.get(name, plain).propose(last, k)
        if proposal.copied:
            lookup_rounds.append(len(draft_lengths))
        drafted_at = time.perf_counter()
        logits = verifier.logits(last, proposal)  # [k + 1, V]
        path, next_token = accept_proposal(proposal, logits, s.sampling, generator)
        verifier.keep(path)
        committed = [proposal.tokens[node - 1] for node in path[1:]] + [next_token]
        drafted, steps = len(proposal.tokens), proposal.steps
        if timed:
            costs = drafted_at - start, time.perf_counter() - drafted_at
        else:
            costs = scheduler.nominal_costs(name, steps, drafted)
        scheduler.observe(name if steps else PLAIN, steps, len(path) - 1, *costs, verified=drafted)
        committed = cut_at_eos(committed, s.eos_ids)
        new_tokens.extend(committed)
        for drafter in drafters.values():
            drafter.observe(committed)
        accept_lengths.append(len(committed))
        draft_lengths.append(drafted)
        if streamer is not None:
            streamer.put(torch.tensor(committed))
    if streamer is not None:
        streamer.end()
    sequences = torch.cat([input_ids, torch.tensor([new_tokens], device=device)], dim=1)
    return GenerateOutput(sequences, accept_lengths, draft_lengths, t1 - t0, time.perf_counter() - t1, lookup_rounds)
