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

Draft lengths. Each row has its own ``DraftPolicy`` that caps the row's drafts (fed nominal costs, see
``sample.nominal_costs``: one batched round has no per-row timing, and sampling needs a timing-free schedule to be
reproducible). Rows draft in lockstep for as many steps as the longest-drafting row; a row stops counting its drafts at
its cap, after a draft below η, or at an end-of-sequence draft. Its later drafts are computed alongside the others but
never verified, so greedy rows stay identical to vanilla greedy decoding and sampled rows stay exact.
"""

from __future__ import annotations

import time

import torch
from transformers import DynamicCache

from .arch import Backbone, attention_bias
from .policy import DraftPolicy, PolicyConfig
from .sample import (
    SamplingConfig,
    accept_sampled,
    draw,
    full_vocab_logits,
    make_generator,
    nominal_costs,
    process,
)


def batch_mask(
    pad: torch.Tensor,  # [b] left padding slots of each row
    past: int,  # slots already cached; the q queries occupy slots past .. past + q - 1
    q: int,
    window: int | None,
    dtype: torch.dtype,
    eager: bool,
) -> torch.Tensor:  # [b, 1, q, past + q]
    """Causal (optionally sliding-window) attention over each row's own slots; padding slots are never attended.

    A padding query (only in the prefill) attends to itself, so that no attention row is empty: an empty row would
    give NaN states whose keys and values, even masked, poison later attention (0 × NaN).
    """
    keys = torch.arange(past + q, device=pad.device)  # [kv]
    queries = past + torch.arange(q, device=pad.device)  # [q]
    allowed = (keys[None, None, :] >= pad[:, None, None]) & (keys[None, None, :] <= queries[None, :, None])
    if window is not None:
        allowed &= queries[None, :, None] - keys[None, None, :] < window
    allowed |= keys[None, None, :] == queries[None, :, None]
    return attention_bias(allowed[:, None], dtype, eager)


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
        backbone, q = self.backbone, hidden.shape[1]
        past = self.base.get_seq_length(start)
        pe = backbone.rotary_emb(hidden, position_ids=slot_positions(self.pad, past, q))
        masks: dict[int | None, torch.Tensor] = {}
        for idx in range(start, end):
            window = backbone.windows[idx]
            if window not in masks:
                masks[window] = batch_mask(self.pad, past, q, window, hidden.dtype, backbone.eager)
            hidden = backbone.layers[idx](hidden, attention_mask=masks[window], position_embeddings=pe, cache=self.base)
        return hidden

    def shallow(self, tokens: torch.Tensor) -> torch.Tensor:  # [b, q] -> exit states [b, q, H]
        return self.run_layers(self.backbone.embed_tokens(tokens), 0, self.exit_layer)

    def deep_logits(self, states: torch.Tensor) -> torch.Tensor:  # exit states [b, q, H] -> logits [b, q, V]
        hidden = self.run_layers(states, self.exit_layer, self.backbone.num_layers)
        return self.backbone.lm_head(self.backbone.norm(hidden))

    def adapt(self, states: torch.Tensor) -> torch.Tensor:  # exit states [b, q, H] -> adapter output [b, q, H]
        past, q = self.adapter_cache.get_seq_length(0), states.shape[1]
        pe = self.backbone.rotary_emb(states, position_ids=slot_positions(self.pad, past, q))
        mask = batch_mask(self.pad, past, q, None, states.dtype, self.backbone.eager)
        return self.adapter(states, position_embeddings=pe, attention_mask=mask, cache=self.adapter_cache)

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:  # [b, T] left-padded -> last logits [b, V]
        exit_states = self.shallow(input_ids)  # [b, T, H]
        self.adapt(exit_states)  # the adapter reads the prompt now, so its slots match the base cache's
        hidden = self.run_layers(exit_states, self.exit_layer, self.backbone.num_layers)[:, -1]
        return self.backbone.lm_head(self.backbone.norm(hidden))

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
                q = process(full_vocab_logits(self.head, logits, self.vocab_size), cfg)  # [b, V]
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


def accept_greedy_batch(
    drafts: torch.Tensor,  # [b, k]
    counted: torch.Tensor,  # [b]
    logits: torch.Tensor,  # [b, k + 1, V]
) -> tuple[torch.Tensor, torch.Tensor]:  # accepted drafts [b], next token [b]
    """Per row: the leading counted drafts equal to the model's argmax, and the model's token after them."""
    k = drafts.shape[1]
    targets = logits.argmax(dim=-1)  # [b, k + 1]
    match = (drafts == targets[:, :k]) & (torch.arange(k, device=drafts.device)[None] < counted[:, None])
    accepted = match.long().cumprod(dim=-1).sum(dim=-1)
    return accepted, targets.gather(1, accepted[:, None])[:, 0]


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


def check_batch(
    km, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int, threshold, steps
) -> torch.Tensor:  # left padding of each row [B]
    """Validate a batch: shapes, left padding only, and every row's prompt as a single prompt is checked."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.long, torch.int):
        raise ValueError("input_ids must be an integer torch tensor of shape [B, T].")
    if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must have shape [B, T] with B, T >= 1; got {list(input_ids.shape)}.")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        got = list(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(
            f"attention_mask must be a tensor of input_ids' shape {list(input_ids.shape)}; got {got}. Pass the mask "
            f"the tokenizer returned with the ids."
        )
    mask = attention_mask.to(device=input_ids.device)
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (token).")
    mask = mask.long()
    if not bool((mask[:, 1:] >= mask[:, :-1]).all()):
        raise ValueError(
            "attention_mask has padding after a token (right padding or holes); Kangaroo batches need left padding: "
            "set tokenizer.padding_side = 'left' before tokenizing."
        )
    lengths = mask.sum(dim=1)
    if bool((lengths == 0).any()):
        empty = (lengths == 0).nonzero()[:, 0].tolist()
        raise ValueError(f"Rows {empty} of attention_mask are all padding; every prompt needs at least one token.")
    pad = input_ids.shape[1] - lengths
    for row in range(input_ids.shape[0]):
        km._check_inputs(input_ids[row : row + 1, int(pad[row]) :], max_new_tokens, threshold, steps)
    return pad


@torch.inference_mode()
def generate_batch(
    km,  # KangarooModel
    input_ids: torch.Tensor,  # [B, T], left-padded
    attention_mask: torch.Tensor | None,  # [B, T], 0 on the left padding
    max_new_tokens: int,
    threshold: float | None,
    max_draft_steps: int | None,
    eos_token_id,
    streamer,
    policy: str | PolicyConfig,
    cfg: SamplingConfig,
    seed: int | None,
):
    """Decode a batch; rows finish independently. Returns ``GenerateOutput`` with sequences [B, T + n_max] (rows
    padded with the pad token after they finish) and per-row lists of accept and draft lengths."""
    from .model import GenerateOutput

    threshold, max_draft_steps = km.resolve_generation(threshold, max_draft_steps)
    if streamer is not None:
        raise ValueError("A streamer takes one prompt: pass input_ids of shape [1, T] without attention_mask.")
    pad = check_batch(km, input_ids, attention_mask, max_new_tokens, threshold, max_draft_steps)
    eos_ids = km.resolve_eos(eos_token_id)
    device = km.backbone.embed_tokens.weight.device
    input_ids, pad = input_ids.to(device=device, dtype=torch.long), pad.to(device)
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)
    batch = input_ids.shape[0]
    planners = [DraftPolicy.create(policy, max_draft_steps) for _ in range(batch)]
    generator = None if cfg.greedy else make_generator(seed, device)
    decoder = BatchDecoder(km, pad)

    def choose(logits: torch.Tensor) -> torch.Tensor:  # [b, V] -> [b]
        return logits.argmax(dim=-1) if cfg.greedy else draw(process(logits, cfg), generator)

    t0 = time.perf_counter()
    last = choose(decoder.prefill(input_ids))  # [B]
    t1 = time.perf_counter()
    new_tokens = [[token] for token in last.tolist()]
    accept_lengths: list[list[int]] = [[1] for _ in range(batch)]
    draft_lengths: list[list[int]] = [[] for _ in range(batch)]

    def running(row: int) -> bool:
        return new_tokens[row][-1] not in eos_ids and len(new_tokens[row]) < max_new_tokens

    active = [row for row in range(batch) if running(row)]  # original index of each row still in the caches
    if 0 < len(active) < batch:
        keep = torch.tensor(active, device=device)
        decoder.realign(keep, torch.full((len(active),), input_ids.shape[1], device=device))
        last = last[keep]
    while active:
        length = decoder.base.get_seq_length(0)  # S: slots of every row before this round
        caps = torch.tensor(
            [planners[row].plan(remaining=max_new_tokens - len(new_tokens[row])) for row in active], device=device
        )
        drafts, counted, q, exits = decoder.draft(last, caps, threshold, eos, cfg, generator)  # [b, k], [b], ...
        logits = decoder.verify(last, drafts, exits)  # [b, k + 1, V]
        if cfg.greedy:
            accepted, next_tokens = accept_greedy_batch(drafts, counted, logits)
        else:
            accepted, next_tokens = accept_sampled(drafts, counted, q, process(logits, cfg), generator)

        for i, row in enumerate(active):
            n, drafted = int(accepted[i]), int(counted[i])
            committed = drafts[i, :n].tolist() + [int(next_tokens[i])]
            for j, token in enumerate(committed):  # stop right after an end-of-sequence token
                if token in eos_ids:
                    committed = committed[: j + 1]
                    break
            new_tokens[row].extend(committed)
            accept_lengths[row].append(len(committed))
            draft_lengths[row].append(drafted)
            planners[row].update(drafted, n, *nominal_costs(planners[row], drafted))
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
    return GenerateOutput(sequences, accept_lengths, draft_lengths, t1 - t0, time.perf_counter() - t1)
