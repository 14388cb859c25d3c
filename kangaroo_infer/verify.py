"""Verification: deep layers [ℓ, L) over the exit states of all pending tokens in one pass, then the rollback."""

from __future__ import annotations

import torch

from .arch import Backbone
from .cache import KangarooCache
from .draft import Proposal, shallow_step


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


class Verifier:
    """The deep layers' pass over a chain proposal, and the caches' rollback to what acceptance kept.

    ``logits`` gives the newest token its shallow pass (a copied proposal: every token, since no model pass has
    seen them), then runs layers [ℓ, L) once over every pending token: the last committed token and the k proposed.
    ``keep`` then keeps the last committed token + the n accepted tokens in every cache, and queues for the adapter
    the exit states it has not read: the last kept token's when it read the drafts while drafting them, else those of
    every kept token of the round.
    """

    def __init__(self, backbone: Backbone, exit_layer: int, cache: KangarooCache):
        self.backbone, self.exit_layer, self.cache = backbone, exit_layer, cache
        self._start = 0
        self._states: torch.Tensor | None = None  # [1, k + 1, H] exit states of the verified tokens
        self._copied = False

    def logits(self, last_token: int, proposal: Proposal) -> torch.Tensor:  # [k + 1, V]
        device = self.backbone.embed_tokens.weight.device
        tokens = [last_token, *proposal.tokens] if proposal.copied else [(proposal.tokens or [last_token])[-1]]
        shallow_step(self.backbone, self.exit_layer, self.cache, torch.tensor([tokens], device=device))
        self._start, self._copied = self.cache.deep_len, proposal.copied
        logits, self._states = deep_logits(self.backbone, self.exit_layer, self.cache)  # [k + 1, V], [1, k + 1, H]
        return logits

    def keep(self, accepted: int) -> None:
        states, n = self._states, accepted
        self.cache.rollback(self._start + n + 1, states[:, : n + 1] if self._copied else states[:, n : n + 1])
        self._states = None
