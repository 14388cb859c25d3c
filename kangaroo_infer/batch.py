"""Batched Kangaroo decoding: B left-padded prompts at once, each row drafting, accepting and rolling back its own
number of tokens every round, and stopping on its own (EOS or max_new_tokens).

Cache layout. Every cache (one ``DynamicCache`` for all base layers, one for the adapter's attention) holds the same
number S of slots for every row at the start of a round. Row b's tokens are right-aligned in slots [pad_b, S); the
pad_b slots on the left are padding that no query may attend to. The token in slot s of row b sits at position
s − pad_b. A round appends the same slots to every row (the last committed token and k drafts; drafting fills the
shallow layers and the adapter, verification fills the deep layers), so rows stay aligned within a round. After
verification row b keeps only the slots of its last committed token and its n_b accepted drafts; the round's other
slots are rejected drafts at the row's right end. Rows are then realigned: for every layer, a per-row gather of the
key/value tensors moves each row's kept slots so that all rows end at the new common length S' (= the longest row),
which grows the left padding of rows that accepted fewer tokens. Padding shared by all rows is dropped, and rows that
finished leave the batch in the same gather. When every row kept the same number of slots and none finished, the
gather is a plain slice. The adapter's cache uses the same slots as the base cache: at verification the adapter also
reads the newest token's exit state (its output is not needed), so the same gather applies to every cache.

Rounds. One scheduler (``scheduler.py``) decides for the whole batch, from the batch round's measured cost and every
row's acceptance: the adapter drafts k tokens in lockstep (a row stops counting its drafts after a draft below η or
an end-of-sequence draft; its later drafts are computed alongside the others but never verified), or every row
proposes its own lookup copy (``lookup.py``, one index per row; a row without a match proposes nothing), or the
round is a plain batched step when drafting does not pay. Acceptance is the same rule as for one prompt
(``accept.py``), per row, so greedy rows stay identical to vanilla greedy decoding and sampled rows stay exact.
"""

from __future__ import annotations

import time

import torch
from transformers import DynamicCache

from .accept import accept, cut_at_eos
from .arch import Backbone, PaddedRows
from .lookup import Lookup
from .outputs import GenerateOutput
from .proposal import ADAPTER, LOOKUP
from .sample import SamplingConfig, draw, full_vocab_logits, make_generator, process
from .scheduler import PLAIN, Scheduler
from .settings import GenerationSettings


def left_pad(x: torch.Tensor, width: int, dim: int = 1) -> torch.Tensor:
    """Zeros before ``x`` along ``dim`` up to ``width`` (padding slots are never attended)."""
    shape = list(x.shape)
    shape[dim] = width - x.shape[dim]
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def slot_positions(pad: torch.Tensor, start: int, q: int) -> torch.Tensor:  # [b, q]
    """Positions of slots start .. start + q - 1 in each row (padding slots get position 0)."""
    return ((start + torch.arange(q, device=pad.device))[None, :] - pad[:, None]).clamp_min(0)


class BatchDecoder:
    """The caches of a batch and the batched forward pieces; rows are the batch's still-active rows."""

    def __init__(self, km, pad: torch.Tensor):
        self.backbone: Backbone = km.backbone
        self.adapter = km.adapter
        self.head = km.draft_head
        self.exit_layer: int = km.exit_layer
        self.vocab_size: int = km.backbone.lm_head.weight.shape[0]
        self.base = DynamicCache()
        self.adapter_cache = DynamicCache()
        self.pad = pad  # [b]

    def run_layers(self, hidden: torch.Tensor, start: int, end: int) -> torch.Tensor:  # [b, q, H] -> [b, q, H]
        """Decoder layers [start, end) over q new slots appended after each layer's cached slots."""
        past, q = self.base.get_seq_length(start), hidden.shape[1]
        pe = self.backbone.rotary_emb(hidden, position_ids=slot_positions(self.pad, past, q))
        slots = torch.arange(past, past + q, device=hidden.device)
        return self.backbone.run_layers(hidden, start, end, pe, slots, self.base, PaddedRows(self.pad))

    def shallow(self, tokens: torch.Tensor) -> torch.Tensor:  # [b, q] -> exit states [b, q, H]
        return self.run_layers(self.backbone.embed_tokens(tokens), 0, self.exit_layer)

    def deep_logits(self, states: torch.Tensor) -> torch.Tensor:  # exit states [b, q, H] -> logits [b, q, V]
        return self.backbone.logits(self.run_layers(states, self.exit_layer, self.backbone.num_layers))

    def adapt(self, states: torch.Tensor) -> torch.Tensor:  # exit states [b, q, H] -> adapter output [b, q, H]
        past, q = self.adapter_cache.get_seq_length(0), states.shape[1]
        pe = self.backbone.rotary_emb(states, position_ids=slot_positions(self.pad, past, q))
        slots = torch.arange(past, past + q, device=states.device)
        mask = PaddedRows(self.pad).bias(slots, past, None, states.dtype, self.backbone.eager)
        return self.adapter(states, position_embeddings=pe, attention_mask=mask, cache=self.adapter_cache)

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:  # [b, T] left-padded -> last logits [b, V]
        """Each prompt's prefill alone (``Backbone.prefill``, as its own ``generate`` computes it: a padded batch
        pass would round rows differently, and computes the padding), then its keys and values left-padded into
        the batch cache; the adapter reads the prompts' exit states now, so its slots match the base cache's."""
        backbone, width = self.backbone, input_ids.shape[1]
        logits, exits, caches = [], [], []
        for row in range(input_ids.shape[0]):
            cache = DynamicCache()
            prompt = input_ids[row : row + 1, int(self.pad[row]) :]  # [1, T_b]
            row_logits, exit_states = backbone.prefill(prompt, self.exit_layer, cache)
            logits.append(row_logits)  # [1, V]
            exits.append(left_pad(exit_states, width))  # [1, T, H]
            caches.append(cache)
        for idx in range(backbone.num_layers):
            keys = torch.cat([left_pad(c.layers[idx].keys, width, dim=2) for c in caches])  # [b, Hkv, T, d]
            values = torch.cat([left_pad(c.layers[idx].values, width, dim=2) for c in caches])
            self.base.update(keys, values, idx)
        self.adapt(torch.cat(exits))
        return torch.cat(logits)

    def draft(
        self,
        last: torch.Tensor,  # [b] newest committed tokens
        caps: torch.Tensor,  # [b] most drafts each row may count
        threshold: float,
        eos: torch.Tensor,  # [e] end-of-sequence ids
        cfg: SamplingConfig,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
        """Draft in lockstep; returns drafts [b, k], counted drafts per row [b], q [b, k, V] (sampling) and the
        exit states [b, 1, H] of the k tokens drafting fed through the shallow layers."""
        running = caps > 0
        counted = torch.zeros_like(caps)
        drafts, qs, exits = [], [], []
        token = last
        for _ in range(int(caps.max())):
            if not bool(running.any()):
                break
            exit_state = self.shallow(token[:, None])  # [b, 1, H]
            exits.append(exit_state)
            logits = self.head.logits(self.adapt(exit_state)[:, -1])  # [b, V_draft]
            if cfg.greedy:
                confidence, index = logits.float().softmax(dim=-1).max(dim=-1)
                token = index if self.head.vocab is None else self.head.vocab[index]
            else:
                q = process(full_vocab_logits(self.head.vocab, logits, self.vocab_size), cfg)  # [b, V]
                token = draw(q, generator)
                confidence = q.max(dim=-1).values
                qs.append(q)
            drafts.append(token)
            counted += running.long()
            running &= (confidence >= threshold) & ~torch.isin(token, eos) & (counted < caps)
        b = last.shape[0]
        draft_tokens = torch.stack(drafts, dim=1) if drafts else last.new_zeros(b, 0)
        if cfg.greedy:
            q_all = None
        else:
            q_all = torch.stack(qs, dim=1) if qs else torch.zeros(b, 0, self.vocab_size, device=last.device)
        return draft_tokens, counted, q_all, exits

    def verify(self, last: torch.Tensor, drafts: torch.Tensor, exits: list[torch.Tensor]) -> torch.Tensor:
        """Shallow pass of the newest token, then the deep layers over all k + 1 round slots: logits [b, k + 1, V]."""
        newest = drafts[:, -1] if drafts.shape[1] else last
        exit_state = self.shallow(newest[:, None])  # [b, 1, H]
        self.adapt(exit_state)  # keeps the adapter's slots equal to the base cache's (a fully accepted row needs it)
        return self.deep_logits(torch.cat([*exits, exit_state], dim=1))

    def verify_copies(self, last: torch.Tensor, copies: torch.Tensor) -> torch.Tensor:
        """All layers over each row's last token + its copied tokens ([b, k], no model pass has seen them):
        logits [b, k + 1, V]. The adapter reads them too, keeping its slots equal to the base cache's."""
        exit_states = self.shallow(torch.cat([last[:, None], copies], dim=1))  # [b, k + 1, H]
        self.adapt(exit_states)
        return self.deep_logits(exit_states)

    def realign(self, keep: torch.Tensor, ends: torch.Tensor) -> None:
        """Keep rows ``keep`` ([b']) with slots [pad, ends) each; move them to end at one common length."""
        pad = self.pad[keep]
        lengths = ends - pad  # [b']
        new_len = int(lengths.max())
        shift = ends - new_len  # [b'] new slot s holds old slot s + shift
        layers = [*self.base.layers, *self.adapter_cache.layers]
        same_rows = keep.shape[0] == self.pad.shape[0]  # keep is sorted, so all rows kept means keep == arange
        if same_rows and bool((shift == shift[0]).all()):
            first = int(shift[0])
            for layer in layers:
                layer.keys = layer.keys[:, :, first : first + new_len]
                layer.values = layer.values[:, :, first : first + new_len]
        else:
            source = (torch.arange(new_len, device=keep.device)[None, :] + shift[:, None]).clamp_min(0)  # [b', S']
            for layer in layers:
                index = source[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
                layer.keys = layer.keys[keep].gather(2, index)
                layer.values = layer.values[keep].gather(2, index)
        self.pad = new_len - lengths


def pad_token_id(km) -> int:
    """The base's pad token, else its (first) end-of-sequence token, else 0."""
    config = km.base.generation_config
    for candidate in (config.pad_token_id, config.eos_token_id):
        if isinstance(candidate, list | tuple):
            candidate = candidate[0] if candidate else None
        if isinstance(candidate, torch.Tensor):
            candidate = candidate.flatten()[0].item() if candidate.numel() else None
        if candidate is not None:
            return int(candidate)
    return 0


@torch.inference_mode()
def decode_batch(
    km,  # KangarooModel
    input_ids: torch.Tensor,  # [B, T], left-padded, validated
    pad: torch.Tensor,  # [B] left padding of each row
    settings: GenerationSettings,
) -> GenerateOutput:
    """Decode a batch; rows finish independently. Returns ``GenerateOutput`` with sequences [B, T + n_max] (rows
    padded with the pad token after they finish) and per-row lists of accept and draft lengths and lookup rounds."""
    s, cfg = settings, settings.sampling
    eos_ids = s.eos_ids
    device = km.backbone.embed_tokens.weight.device
    input_ids, pad = input_ids.to(device=device, dtype=torch.long), pad.to(device)
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)
    batch = input_ids.shape[0]
    timed = cfg.greedy  # sampling: a timing-free schedule keeps seeds reproducible
    scheduler = Scheduler.create(s.policy, {ADAPTER: False, LOOKUP: True}, timed=timed)
    generator = None if cfg.greedy else make_generator(s.seed, device)
    decoder = BatchDecoder(km, pad)
    lookups = None
    if s.lookup_tokens:
        rows = [input_ids[row, int(pad[row]) :].tolist() for row in range(batch)]
        lookups = [Lookup(tokens, s.lookup_tokens, s.lookup_min_ngram, s.lookup_max_ngram) for tokens in rows]

    t0 = time.perf_counter()
    logits = decoder.prefill(input_ids)  # [B, V]
    last = logits.argmax(dim=-1) if cfg.greedy else draw(process(logits, cfg), generator)  # [B]
    t1 = time.perf_counter()
    new_tokens = [[token] for token in last.tolist()]
    accept_lengths: list[list[int]] = [[1] for _ in range(batch)]
    draft_lengths: list[list[int]] = [[] for _ in range(batch)]
    lookup_rounds: list[list[int]] = [[] for _ in range(batch)]
    if lookups is not None:
        for row, tokens in enumerate(new_tokens):
            lookups[row].observe(tokens)

    def running(row: int) -> bool:
        return new_tokens[row][-1] not in eos_ids and len(new_tokens[row]) < s.max_new_tokens

    active = [row for row in range(batch) if running(row)]  # original index of each row still in the caches
    if 0 < len(active) < batch:
        keep = torch.tensor(active, device=device)
        decoder.realign(keep, torch.full((len(active),), input_ids.shape[1], device=device))
        last = last[keep]
    while active:
        length = decoder.base.get_seq_length(0)  # S: slots of every row before this round
        limits = [s.max_new_tokens - len(new_tokens[row]) - 1 for row in active]  # most drafts each row may count
        offers = {ADAPTER: min(s.max_draft_steps, max(limits))}
        if lookups is not None:
            offers[LOOKUP] = max(lookups[row].offer(limits[i]) for i, row in enumerate(active))
        start = time.perf_counter()
        drafter, k = scheduler.choose(offers)
        caps = torch.tensor([min(k, limit) for limit in limits], device=device)  # [b]
        q = None
        if drafter == LOOKUP:
            copies = [lookups[row].propose(int(last[i]), k).tokens for i, row in enumerate(active)]
            counted = torch.tensor([len(c) for c in copies], device=device)
            drafts = torch.tensor([(c[:k] + [0] * k)[:k] for c in copies], dtype=torch.long, device=device)  # [b, k]
            drafted_at = time.perf_counter()
            logits = decoder.verify_copies(last, drafts)  # [b, k + 1, V]
        else:
            drafts, counted, q, exits = decoder.draft(last, caps, s.threshold, eos, cfg, generator)  # [b, k], [b]
            drafted_at = time.perf_counter()
            logits = decoder.verify(last, drafts, exits)  # [b, k + 1, V]
        accepted, next_tokens = accept(drafts, counted, logits, cfg, q, generator)
        width = drafts.shape[1]
        if timed:
            costs = drafted_at - start, time.perf_counter() - drafted_at
        else:
            costs = scheduler.nominal_costs(drafter, width)
        outcomes = [(int(counted[i]), int(accepted[i])) for i in range(len(active))]
        scheduler.observe_rows(drafter if width else PLAIN, width, outcomes, *costs)

        for i, row in enumerate(active):
            n, drafted = outcomes[i][1], outcomes[i][0]
            committed = cut_at_eos(drafts[i, :n].tolist() + [int(next_tokens[i])], eos_ids)
            new_tokens[row].extend(committed)
            if lookups is not None:
                lookups[row].observe(committed)
            if drafter == LOOKUP and drafted:
                lookup_rounds[row].append(len(draft_lengths[row]))
            accept_lengths[row].append(len(committed))
            draft_lengths[row].append(drafted)
        still = [i for i, row in enumerate(active) if running(row)]
        if not still:
            break
        keep = torch.tensor(still, device=device)
        decoder.realign(keep, (length + accepted + 1)[keep])  # keep the last committed token + accepted drafts
        active = [active[i] for i in still]
        last = next_tokens[keep]

    n_max = max(len(tokens) for tokens in new_tokens)
    out = torch.full((batch, n_max), pad_token_id(km), dtype=torch.long, device=device)
    for row, tokens in enumerate(new_tokens):
        out[row, : len(tokens)] = torch.tensor(tokens, device=device)
    sequences = torch.cat([input_ids, out], dim=1)
    return GenerateOutput(sequences, accept_lengths, draft_lengths, t1 - t0, time.perf_counter() - t1, lookup_rounds)
