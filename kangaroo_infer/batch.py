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
gather is a plain slice. A tree round keeps each row's accepted path, whose slots need not be next to each other, by
the same gather. The adapter's cache holds the same slots less the newest m of every row, whose exit states
wait in ``unread`` [b, m, H] for its next call (the rule of ``cache.py``, one for a prompt and a batch); the same
gather realigns them. In a lookup round the adapter reads the copies at verification, as the rows keep different
numbers of them.

Rounds. The loop is the one of a single prompt (``rounds.decode``); ``BatchRows`` is the engine it drives for a
batch. One scheduler (``scheduler.py``) decides for the whole batch, from the batch round's measured cost and every
row's acceptance: the adapter drafts k tokens in lockstep (a row stops counting its drafts after a draft below η or
an end-of-sequence draft; its later drafts are computed alongside the others but never verified), or with
``tree=True`` every row grows its own draft tree, the rows' levels in lockstep (``TreeRound``), or every row
proposes its own lookup copy (``lookup.py``, one index per row; a row without a match proposes nothing), or the
round is a plain batched step when drafting does not pay. Acceptance is the same rule as for one prompt
(``accept.py``), per row, so greedy rows stay identical to vanilla greedy decoding and sampled rows stay exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from .accept import accept, accept_proposal
from .arch import Backbone, PaddedRows, TreeAttention
from .cache import unread_after
from .draft import DraftPick
from .lookup import Lookup
from .proposal import ADAPTER, LOOKUP, Proposal, Tree
from .rounds import RoundResult
from .settings import GenerationSettings
from .tree import grow_level


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
        self.pick = DraftPick(km.draft_head, settings.sampling, km.backbone.lm_head.weight.shape[0], generator)
        self.exit_layer: int = km.exit_layer
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
        self._round: tuple | None = None  # what propose left for verify: (name, last, drafts, counted, q, exits)
        self._trees: TreeRound | None = None  # or, for a tree round, its trees
        self._length = 0  # slots of every row before the round

    @property
    def scheduler_drafters(self) -> tuple[dict[str, bool], dict[str, tuple[int, int]] | None]:
        s = self.settings
        return {ADAPTER: False, LOOKUP: True}, ({ADAPTER: (s.tree_top_k, s.tree_max_nodes)} if s.tree else None)

    def offer(self, limits: list[int]) -> dict[str, list[int]]:  # per drafter, what each active row could propose
        offers = {ADAPTER: [min(self.settings.max_draft_steps, limit) for limit in limits]}
        if self.lookups is not None:
            offers[LOOKUP] = [self.lookups[row].offer(limit) for row, limit in zip(self.active, limits, strict=True)]
        return offers

    def propose(self, name: str | None, k: int, last: list[int], limits: list[int]) -> None:
        s, device = self.settings, self.input_ids.device
        self._length = self.base.get_seq_length(0)  # slots of every row before the round
        self._known = self.unread  # the round's exit states join them at verification
        self._trees = None
        last_t = torch.tensor(last, dtype=torch.long, device=device)  # [b]
        if name == LOOKUP:
            copies = [self.lookups[row].propose(token, k).tokens for row, token in zip(self.active, last, strict=True)]
            counted = torch.tensor([len(c) for c in copies], device=device)
            drafts = torch.tensor([(c + [0] * k)[:k] for c in copies], dtype=torch.long, device=device)  # [b, k]
            self._round = (name, last_t, drafts, counted, None, None)
        elif name == ADAPTER and s.tree:
            self._trees = self.draft_trees(last, [min(k, limit) for limit in limits])
        else:
            caps = torch.tensor([min(k, limit) for limit in limits], device=device)  # [b]
            drafts, counted, q, exits = self.draft(last_t, caps, s.threshold, self.eos)
            self._round = (name, last_t, drafts, counted, q, exits)

    def verify(self) -> RoundResult:
        if self._trees is not None:
            return self.verify_trees(self._trees)
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
        if result is not None and self._trees is not None:
            self.keep_paths(keep, self._trees)
            self.active = [self.active[i] for i in still]
            return
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
            token, confidence, q = self.pick(self.head.logits(self.adapt(exit_state)[:, -1]))  # from [b, V_draft]
            if q is not None:
                qs.append(q)
            drafts.append(token)
            counted += running.long()
            running &= (confidence >= threshold) & ~torch.isin(token, eos) & (counted < caps)
        b = last.shape[0]
        draft_tokens = torch.stack(drafts, dim=1) if drafts else last.new_zeros(b, 0)
        if self.pick.sampling.greedy:
            q_all = None
        else:
            q_all = torch.stack(qs, dim=1) if qs else torch.zeros(b, 0, self.pick.vocab_size, device=last.device)
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
        same_rows = keep.shape[0] == self.pad.shape[0]  # keep is sorted, so all rows kept means keep == arange
        if same_rows and bool((shift == shift[0]).all()):
            start = int(shift[0])
            for layer, length in self._caches(new_len, read):
                layer.keys = layer.keys[:, :, start : start + length]
                layer.values = layer.values[:, :, start : start + length]
        else:
            self._gather(keep, (torch.arange(new_len, device=keep.device)[None, :] + shift[:, None]).clamp_min(0), read)
        self.pad = new_len - lengths

    def _caches(self, length: int, read: int) -> list[tuple]:  # (layer cache, slots it keeps): base, then adapter
        return [(layer, length) for layer in self.base.layers] + [(layer, read) for layer in self.adapter_cache.layers]

    def _gather(self, keep: torch.Tensor, source: torch.Tensor, read: int) -> None:
        """Rows ``keep`` of every cache, new slot s of row b from old slot source[b, s] ([b', S']); the adapter's
        first ``read`` slots."""
        for layer, length in self._caches(source.shape[1], read):
            _, heads, slots, dim = layer.keys.shape
            # One index_select over [B·Hkv·S, d] rows copies whole d-vectors: ~13x faster than ``gather`` on the
            # [B, Hkv, S, d] tensor (which indexes every element), for the same values.
            rows = (keep[:, None, None] * heads + torch.arange(heads, device=keep.device)[None, :, None]) * slots
            rows = (rows + source[:, None, :length]).flatten()  # [b' · Hkv · length]
            layer.keys = layer.keys.reshape(-1, dim).index_select(0, rows).view(keep.shape[0], heads, length, dim)
            layer.values = layer.values.reshape(-1, dim).index_select(0, rows).view(keep.shape[0], heads, length, dim)

    def draft_trees(self, last: list[int], caps: list[int]) -> TreeRound:
        """Each row's draft tree (``tree.draft_tree``'s rule, depth ≤ its cap), grown level by level in lockstep: the
        roots as a batched step, then each level's nodes of every row in one shallow pass and one adapter pass, the
        rows' levels padded to the widest. Every node gets its shallow pass (the leaves last)."""
        s, start = self.settings, self.base.get_seq_length(0)
        trees = [Tree.rooted_at(token, s.tree_max_nodes + 1) for token in last]
        for tree in trees:
            tree.adapter_slot[0] = start  # the roots' exit states are the adapter's next read
        rnd = TreeRound(trees, [[0] for _ in last], start, start - self.pad, [])
        roots = self.shallow(torch.tensor(last, device=self.input_ids.device)[:, None])  # [b, 1, H] in slot start
        rnd.exits.append(roots)
        logits = self.head.logits(self.adapt(roots)[:, -1:])  # [b, 1, V_draft]; the roots' adapter slot is start
        expanded = [[0] for _ in last]
        for depth in range(1, max(caps, default=0) + 1):
            grown = [
                grow_level(tree, nodes, logits[i, : len(nodes)], self.head, s.tree_top_k, s.tree_max_nodes,
                           s.threshold, s.eos_ids) if depth <= caps[i] else []
                for i, (tree, nodes) in enumerate(zip(trees, expanded, strict=True))
            ]  # fmt: skip
            expanded = [
                nodes if depth < caps[i] and tree.num_drafts < s.tree_max_nodes else []
                for i, (tree, nodes) in enumerate(zip(trees, grown, strict=True))
            ]
            if not any(expanded):
                break
            past = self.base.get_seq_length(0)  # the adapter's cache holds as many slots now
            exit_states, pe, mask = self.tree_level(rnd, expanded)
            slots = torch.arange(past, past + exit_states.shape[1], device=exit_states.device)
            bias = mask.bias(slots, past, None, exit_states.dtype, self.backbone.eager)
            out = self.adapter(exit_states, position_embeddings=pe, attention_mask=bias, cache=self.adapter_cache)
            logits = self.head.logits(out)  # [b, q, V_draft]
            for tree, nodes in zip(trees, expanded, strict=True):
                tree.adapter_slot.update({node: past + j for j, node in enumerate(nodes)})
        in_cache = [set(nodes) for nodes in rnd.slots]
        leaves = [[n for n in range(len(t.tokens)) if n not in seen] for t, seen in zip(trees, in_cache, strict=True)]
        if any(leaves):
            self.tree_level(rnd, leaves)
        return rnd

    def tree_level(self, rnd: TreeRound, nodes: list[list[int]]) -> tuple[torch.Tensor, tuple, TreeAttention]:
        """Layers [0, ℓ) over each row's ``nodes`` as new round slots; their exit states [b, q, H], rotary
        embeddings and mask (the adapter's pass over the same slots uses both)."""
        device = self.input_ids.device
        padded = rnd.append(nodes)
        tokens = [
            [tree.tokens[n] if n is not None else 0 for n in row] for tree, row in zip(rnd.trees, padded, strict=True)
        ]
        hidden = self.backbone.embed_tokens(torch.tensor(tokens, device=device))  # [b, q, H]
        positions, mask = rnd.mask(hidden.shape[1], self.pad)
        pe = self.backbone.rotary_emb(hidden, position_ids=positions)
        past = self.base.get_seq_length(0)
        slots = torch.arange(past, past + hidden.shape[1], device=device)
        exit_states = self.backbone.run_layers(hidden, 0, self.exit_layer, pe, slots, self.base, mask)
        rnd.exits.append(exit_states)
        return exit_states, pe, mask

    def verify_trees(self, rnd: TreeRound) -> RoundResult:
        """Layers [ℓ, L) over every round slot of every row at once (each node sees the committed prefix and its
        ancestors); each row walks its own tree (``accept_proposal``)."""
        states = torch.cat(rnd.exits, dim=1)  # [b, R, H] in slot order
        width = states.shape[1]
        positions, mask = rnd.mask(width, self.pad)
        pe = self.backbone.rotary_emb(states, position_ids=positions)
        slots = torch.arange(rnd.start, rnd.start + width, device=states.device)
        hidden = self.backbone.run_layers(states, self.exit_layer, self.backbone.num_layers, pe, slots, self.base, mask)
        logits = self.backbone.logits(hidden)  # [b, R, V]
        rnd.states = states
        outcomes, tokens = [], []
        for i, (tree, nodes) in enumerate(zip(rnd.trees, rnd.slots, strict=True)):
            slot = {node: j for j, node in enumerate(nodes) if node is not None}
            rows = torch.tensor([slot[n] for n in range(len(tree.tokens))], device=logits.device)
            path, next_token = accept_proposal(
                Proposal(tree.tokens[1:], tree=tree), logits[i, rows], self.settings.sampling
            )
            rnd.paths.append([slot[n] for n in path])
            outcomes.append((max(tree.depths), len(path) - 1))
            tokens.append([tree.tokens[n] for n in path[1:]] + [next_token])
        drafted = [tree.num_drafts for tree in rnd.trees]
        return RoundResult(max(d for d, _ in outcomes), width - 1, outcomes, drafted, tokens)

    def keep_paths(self, keep: torch.Tensor, rnd: TreeRound) -> None:
        """Keep rows ``keep``, each with its committed slots and its accepted path's round slots, realigned to end at
        one common length. The adapter has read the roots and the expanded nodes; a path ending at a leaf leaves
        that leaf unread, and then every row keeps its newest slot unread (one m for the batch, ``cache.py``)."""
        device = keep.device
        kept, unread_slot, leaf = [], [], False
        for i in keep.tolist():
            tree, nodes, path = rnd.trees[i], rnd.slots[i], rnd.paths[i]
            committed = torch.arange(int(self.pad[i]), rnd.start, device=device)
            kept.append(torch.cat([committed, rnd.start + torch.tensor(path, device=device)]))
            unread_slot.append(path[-1])
            leaf |= nodes[path[-1]] not in tree.adapter_slot
        lengths = torch.tensor([len(k) for k in kept], device=device)
        new_len = int(lengths.max())
        source = torch.zeros(len(kept), new_len, dtype=torch.long, device=device)  # padding reads slot 0
        for row, slots in enumerate(kept):
            source[row, new_len - len(slots) :] = slots
        m = int(leaf)
        self._gather(keep, source, new_len - m)
        index = torch.tensor(unread_slot, device=device)
        self.unread = rnd.states[keep, index][:, None] if m else None  # [b', 1, H]
        self._known, self._trees = None, None
        self.pad = new_len - lengths


@dataclass
class TreeRound:
    """A batch round's draft trees: a tree per row, and the node each round slot holds (None: padding, a row's
    level narrower than the widest)."""

    trees: list[Tree]
    slots: list[list[int | None]]  # [b][R] the node in round slot j (cache slot start + j) of each row
    start: int  # the roots' cache slot
    root_pos: torch.Tensor  # [b] the roots' positions
    exits: list[torch.Tensor]  # [b, q, H] exit states of the round slots, in slot order
    states: torch.Tensor | None = None  # [b, R, H] all of them, at verification
    paths: list[list[int]] = field(default_factory=list)  # per row: round slots of the accepted path

    def append(self, nodes: list[list[int]]) -> list[list[int | None]]:
        """New round slots: each row's nodes, padded to the widest row."""
        width = max(map(len, nodes))
        padded = [row + [None] * (width - len(row)) for row in nodes]
        for slots, row in zip(self.slots, padded, strict=True):
            slots.extend(row)
        return padded

    def mask(self, queries: int, pad: torch.Tensor) -> tuple[torch.Tensor, TreeAttention]:  # positions [b, q], mask
        """The newest ``queries`` round slots over the cache: a node sees its row's committed slots, its ancestors
        and itself; a padding slot sees only itself."""
        b, width, prefix = len(self.trees), len(self.slots[0]), self.start
        allowed = torch.zeros(b, queries, prefix + width, dtype=torch.bool)
        key_positions = torch.zeros(b, prefix + width, dtype=torch.long)
        positions = torch.zeros(b, queries, dtype=torch.long)
        for i, (tree, nodes) in enumerate(zip(self.trees, self.slots, strict=True)):
            first, root = int(pad[i]), int(self.root_pos[i])
            depths = torch.tensor(tree.depths)
            key_positions[i, :prefix] = (torch.arange(prefix) - first).clamp_min(0)
            key_positions[i, prefix:] = root  # a padding slot sits at its root's position: inside any window
            real = [j for j, node in enumerate(nodes) if node is not None]
            columns = torch.tensor([nodes[j] for j in real])
            key_positions[i, prefix + torch.tensor(real)] = root + depths[columns]
            for a, j in enumerate(range(width - queries, width)):
                if nodes[j] is None:
                    allowed[i, a, prefix + j] = True
                    positions[i, a] = root
                else:
                    allowed[i, a, first:prefix] = True
                    allowed[i, a, prefix + torch.tensor(real)] = tree.ancestors[nodes[j], columns]
                    positions[i, a] = root + tree.depths[nodes[j]]
        device = pad.device
        positions = positions.to(device)
        return positions, TreeAttention(allowed.to(device), key_positions.to(device), positions)


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
