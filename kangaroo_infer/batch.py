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
gather is a plain slice. The adapter's cache holds the same slots less the newest m of every row, whose exit states
wait in ``unread`` [b, m, H] for its next call (the rule of ``cache.py``, one for a prompt and a batch); the same
gather realigns them. In a lookup round the adapter reads the copies at verification, as the rows keep different
numbers of them.

Rounds. The loop is the one of a single prompt (``rounds.decode``); ``BatchRows`` is the engine it drives for a
batch. One scheduler (``scheduler.py``) decides for the whole batch, from the batch round's measured cost and every
row's acceptance: the adapter drafts k tokens in lockstep (a row stops counting its drafts after a draft below η or
an end-of-sequence draft; its later drafts are computed alongside the others but never verified), or every row
proposes its own lookup copy (``lookup.py``, one index per row; a row without a match proposes nothing), or the
round is a plain batched step when drafting does not pay. Acceptance is the same rule as for one prompt
(``accept.py``), per row, so greedy rows stay identical to vanilla greedy decoding and sampled rows stay exact.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from .accept import accept
from .arch import Backbone, PaddedRows
from .cache import unread_after
from .lookup import Lookup
from .proposal import ADAPTER, LOOKUP
from .rounds import RoundResult
from .sample import SamplingConfig, draw, full_vocab_logits, process
from .settings import GenerationSettings


def left_pad(x: torch.Tensor, width: int, dim: int = 1) -> torch.Tensor:
    """Zeros before ``x`` along ``dim`` up to ``width`` (padding slots are never attended)."""
    shape = list(x.shape)
    shape[dim] = width - x.shape[dim]
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def slot_positions(pad: torch.Tensor, start: int, q: int) -> torch.Tensor:  # [b, q]
    """Positions of slots start .. start + q - 1 in each row (padding slots get position 0)."""
    return ((start + torch.arange(q, device=pad.device))[None, :] - pad[:, None]).clamp_min(0)


class BatchRows:
    """A batch under the round loop (``rounds.Rows``): its caches, the batched forward pieces, a lookup index per
    row. Rows are the batch's still-active rows, in order."""

    def __init__(
        self,
        km,
        input_ids: torch.Tensor,  # [B, T] left-padded, validated
        pad: torch.Tensor,  # [B] left padding of each row
        settings: GenerationSettings,
        generator: torch.Generator | None,
    ):
        self.backbone: Backbone = km.backbone
        self.adapter = km.adapter
        self.head = km.draft_head
        self.exit_layer: int = km.exit_layer
        self.vocab_size: int = km.backbone.lm_head.weight.shape[0]
        self.settings, self.generator = settings, generator
        device = km.backbone.embed_tokens.weight.device
        self.input_ids = input_ids.to(device=device, dtype=torch.long)
        self.pad = pad.to(device)  # [b]
        self.pad_id = pad_token_id(km)
        self.eos = torch.tensor(sorted(settings.eos_ids), dtype=torch.long, device=device)  # [e]
        self.base = DynamicCache()
        self.adapter_cache = DynamicCache()
        self.unread: torch.Tensor | None = None  # [b, m, H] exit states of every row's newest m slots (cache.py)
        self._known: torch.Tensor | None = None  # [b, n, H] exit states of the base's newest n slots after a round
        self.lookups: list[Lookup] | None = None
        if settings.lookup_tokens:
            s = settings
            prompts = [self.input_ids[row, int(self.pad[row]) :].tolist() for row in range(input_ids.shape[0])]
            self.lookups = [Lookup(p, s.lookup_tokens, s.lookup_min_ngram, s.lookup_max_ngram) for p in prompts]
        self.active = list(range(input_ids.shape[0]))  # original index of each row in the caches
        self._round: tuple | None = None  # what propose left for verify
        self._length = 0  # slots of every row before the round

    @property
    def scheduler_drafters(self) -> tuple[dict[str, bool], None]:
        return {ADAPTER: False, LOOKUP: True}, None

    def offer(self, limits: list[int]) -> dict[str, list[int]]:  # per drafter, what each active row could propose
        offers = {ADAPTER: [min(self.settings.max_draft_steps, limit) for limit in limits]}
        if self.lookups is not None:
            offers[LOOKUP] = [self.lookups[row].offer(limit) for row, limit in zip(self.active, limits, strict=True)]
        return offers

    def propose(self, name: str | None, k: int, last: list[int], limits: list[int]) -> None:
        s, device = self.settings, self.input_ids.device
        self._length = self.base.get_seq_length(0)  # slots of every row before the round
        self._known = self.unread  # the round's exit states join them at verification
        last_t = torch.tensor(last, dtype=torch.long, device=device)  # [b]
        if name == LOOKUP:
            copies = [self.lookups[row].propose(token, k).tokens for row, token in zip(self.active, last, strict=True)]
            counted = torch.tensor([len(c) for c in copies], device=device)
            drafts = torch.tensor([(c + [0] * k)[:k] for c in copies], dtype=torch.long, device=device)  # [b, k]
            self._round = (name, last_t, drafts, counted, None, None)
        else:
            caps = torch.tensor([min(k, limit) for limit in limits], device=device)  # [b]
            drafts, counted, q, exits = self.draft(last_t, caps, s.threshold, self.eos, s.sampling, self.generator)
            self._round = (name, last_t, drafts, counted, q, exits)

    def verify(self) -> RoundResult:
        name, last, drafts, counted, q, exits = self._round
        if name == LOOKUP:
            logits = self.verify_copies(last, drafts)  # [b, k + 1, V]
        else:
            logits = self.verify_drafts(last, drafts, exits)  # [b, k + 1, V]
        accepted, next_tokens = accept(drafts, counted, logits, self.settings.sampling, q, self.generator)
        width, counted_l, accepted_l = drafts.shape[1], counted.tolist(), accepted.tolist()
        tokens = [drafts[i, :n].tolist() + [int(next_tokens[i])] for i, n in enumerate(accepted_l)]
        return RoundResult(width, width, list(zip(counted_l, accepted_l, strict=True)), counted_l, tokens)

    def observe(self, row: int, committed: list[int]) -> None:
        if self.lookups is not None:
            self.lookups[self.active[row]].observe(committed)

    def keep(self, still: list[int], result: RoundResult | None) -> None:
        """Keep the active rows ``still``: after a round, each with its last committed token and accepted drafts;
        right after the prefill (``result`` None), as prefilled."""
        keep = torch.tensor(still, device=self.input_ids.device)
        if result is None:
            ends = torch.full((len(still),), self.base.get_seq_length(0), device=keep.device)
            known = self.unread
        else:
            accepted = torch.tensor([n for _, n in result.outcomes], device=keep.device)  # [b]
            ends = (self._length + accepted + 1)[keep]  # the last committed token + the accepted drafts
            known = self._known
        self.realign(keep, ends, known)
        self.active = [self.active[i] for i in still]

    def sequences(self, new_tokens: list[list[int]]) -> torch.Tensor:  # [B, T + n_max]
        """Each row's prompt and new tokens; a row that finished early is filled with the pad token."""
        out = torch.full((len(new_tokens), max(map(len, new_tokens))), self.pad_id, dtype=torch.long)
        for row, tokens in enumerate(new_tokens):
            out[row, : len(tokens)] = torch.tensor(tokens)
        return torch.cat([self.input_ids, out.to(self.input_ids.device)], dim=1)

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

    def adapt(self, states: torch.Tensor) -> torch.Tensor:  # exit states [b, q, H] -> adapter output [b, m + q, H]
        """The adapter over its unread exit states and ``states``."""
        if self.unread is not None:
            states, self.unread = torch.cat([self.unread, states], dim=1), None
        past, q = self.adapter_cache.get_seq_length(0), states.shape[1]
        pe = self.backbone.rotary_emb(states, position_ids=slot_positions(self.pad, past, q))
        slots = torch.arange(past, past + q, device=states.device)
        mask = PaddedRows(self.pad).bias(slots, past, None, states.dtype, self.backbone.eager)
        return self.adapter(states, position_embeddings=pe, attention_mask=mask, cache=self.adapter_cache)

    def prefill(self) -> torch.Tensor:  # last logits of each left-padded prompt [B, V]
        """Each prompt's prefill alone (``Backbone.prefill``, as its own ``generate`` computes it: a padded batch
        pass would round rows differently, and computes the padding), then its keys and values left-padded into
        the batch cache; the prompts' exit states wait for the adapter's first call."""
        backbone, input_ids = self.backbone, self.input_ids
        width = input_ids.shape[1]
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
        self.unread = torch.cat(exits)  # [B, T, H]
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

    def verify_drafts(self, last: torch.Tensor, drafts: torch.Tensor, exits: list[torch.Tensor]) -> torch.Tensor:
        """Shallow pass of the newest token, then the deep layers over all k + 1 round slots: logits [b, k + 1, V]."""
        newest = drafts[:, -1] if drafts.shape[1] else last
        states = torch.cat([*exits, self.shallow(newest[:, None])], dim=1)  # [b, k + 1, H]
        self.remember(states)
        return self.deep_logits(states)

    def verify_copies(self, last: torch.Tensor, copies: torch.Tensor) -> torch.Tensor:
        """All layers over each row's last token + its copied tokens ([b, k], no model pass has seen them):
        logits [b, k + 1, V]. The adapter reads them too: the rows keep different numbers of them (cache.py)."""
        exit_states = self.shallow(torch.cat([last[:, None], copies], dim=1))  # [b, k + 1, H]
        self.remember(exit_states)
        self.adapt(exit_states)
        return self.deep_logits(exit_states)

    def remember(self, states: torch.Tensor) -> None:  # [b, q, H] exit states of the round's q slots
        self._known = states if self._known is None else torch.cat([self._known, states], dim=1)

    def realign(self, keep: torch.Tensor, ends: torch.Tensor, known: torch.Tensor) -> None:
        """Keep rows ``keep`` ([b']) with slots [pad, ends) each; move them to end at one common length. ``known``
        [b, n, H] holds the exit states of the base's newest n slots; the adapter's unread ones come from it."""
        pad = self.pad[keep]
        lengths = ends - pad  # [b']
        new_len = int(lengths.max())
        shift = ends - new_len  # [b'] new slot s holds old slot s + shift
        first = self.base.get_seq_length(0) - known.shape[1]
        unread = unread_after(known[keep], first, ends, self.adapter_cache.get_seq_length(0), new_len)
        self.unread, self._known = (unread if unread.shape[1] else None), None
        read = new_len - unread.shape[1]  # the adapter's slots after the realignment
        caches = [(layer, new_len) for layer in self.base.layers]
        caches += [(layer, read) for layer in self.adapter_cache.layers]
        same_rows = keep.shape[0] == self.pad.shape[0]  # keep is sorted, so all rows kept means keep == arange
        if same_rows and bool((shift == shift[0]).all()):
            start = int(shift[0])
            for layer, length in caches:
                layer.keys = layer.keys[:, :, start : start + length]
                layer.values = layer.values[:, :, start : start + length]
        else:
            source = (torch.arange(new_len, device=keep.device)[None, :] + shift[:, None]).clamp_min(0)  # [b', S']
            for layer, length in caches:
                index = source[:, None, :length, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
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
