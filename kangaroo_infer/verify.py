"""Verification: deep layers [ℓ, L) over the exit states of all pending tokens in one pass, then greedy acceptance."""

from __future__ import annotations

import torch

from .arch import Backbone
from .cache import KangarooCache
from .draft import shallow_step


def deep_logits(
    backbone: Backbone,
    exit_layer: int,
    cache: KangarooCache,
    last_only: bool = False,
    positions: torch.Tensor | None = None,  # [m]; default: the m pending tokens continue the sequence
    tree: tuple[torch.Tensor, torch.Tensor] | None = None,  # tree attention (see Backbone.run_layers)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Finish the forward pass of every pending token; return logits [m, V] (or [1, V]) and exit states [1, m, H]."""
    states = cache.take_deep_pending()  # [1, m, H]
    if positions is None:
        start = cache.deep_len
        positions = torch.arange(start, start + states.shape[1], device=states.device)
    pe = backbone.rotary_emb(states, position_ids=positions[None])
    hidden = backbone.run_layers(states, exit_layer, backbone.num_layers, pe, positions, cache.base, tree)
    if last_only:
        hidden = hidden[:, -1:]
    return backbone.lm_head(backbone.norm(hidden))[0], states


def accept_greedy(drafts: list[int], targets: list[int]) -> int:
    """Number of leading drafts equal to the full model's greedy choice at the same position.

    ``targets[i]`` is the model's token after the i-th pending token, so draft i (0-based) is checked against it.
    """
    n = 0
    while n < len(drafts) and drafts[n] == targets[n]:
        n += 1
    return n


def verify_chain(
    backbone: Backbone, exit_layer: int, cache: KangarooCache, last_token: int, drafts: list[int]
) -> list[int]:
    """Verify ``drafts`` proposed after ``last_token``; return the committed tokens.

    The newest token gets its shallow pass first; then the deep layers run over every pending token (the last
    committed token + drafts). Commits the accepted drafts plus the model's own next token, and rolls every cache
    back to the accepted path.
    """
    newest = drafts[-1] if drafts else last_token
    device = backbone.embed_tokens.weight.device
    shallow_step(backbone, exit_layer, cache, torch.tensor([[newest]], device=device))
    return _verify_pending(backbone, exit_layer, cache, drafts, adapter_saw_drafts=True)


def verify_lookup(
    backbone: Backbone, exit_layer: int, cache: KangarooCache, last_token: int, drafts: list[int]
) -> list[int]:
    """Verify drafts that cost no model pass to propose (``lookup.py``); return the committed tokens.

    The last committed token and the k drafts go through all layers at once (shallow, then deep): one forward
    pass over k + 1 rows. The adapter has seen none of them; the exit states of those committed are queued for it.
    """
    device = backbone.embed_tokens.weight.device
    shallow_step(backbone, exit_layer, cache, torch.tensor([[last_token, *drafts]], device=device))
    return _verify_pending(backbone, exit_layer, cache, drafts, adapter_saw_drafts=False)


def _verify_pending(
    backbone: Backbone, exit_layer: int, cache: KangarooCache, drafts: list[int], adapter_saw_drafts: bool
) -> list[int]:
    """Deep layers over the pending tokens (the last committed token + ``drafts``, all past their shallow pass),
    greedy acceptance, rollback. The adapter needs the exit state of the last kept token only when it read the
    drafts while drafting them, else those of every kept token of this round."""
    start = cache.deep_len
    logits, states = deep_logits(backbone, exit_layer, cache)  # [k + 1, V], [1, k + 1, H]
    targets = logits.argmax(dim=-1).tolist()
    n = accept_greedy(drafts, targets)
    cache.rollback(start + n + 1, states[:, n : n + 1] if adapter_saw_drafts else states[:, : n + 1])
    return drafts[:n] + [targets[n]]
