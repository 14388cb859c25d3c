"""Verification: deep layers [ℓ, L) over the exit states of all pending tokens in one pass, then the rollback."""

from __future__ import annotations

import torch

from .arch import Backbone, Mask, TreeAttention
from .cache import KangarooCache
from .draft import shallow_step
from .proposal import Proposal


def deep_logits(
    backbone: Backbone,
    exit_layer: int,
    cache: KangarooCache,
    positions: torch.Tensor | None = None,  # [m]; default: the m pending tokens continue the sequence
    mask: Mask | None = None,  # default: the pending tokens continue the sequence causally
) -> tuple[torch.Tensor, torch.Tensor]:
    """Finish the forward pass of every pending token; return logits [m, V] and exit states [1, m, H]."""
    states = cache.take_deep_pending()  # [1, m, H]
    if positions is None:
        start = cache.deep_len
        positions = torch.arange(start, start + states.shape[1], device=states.device)
    pe = backbone.rotary_emb(states, position_ids=positions[None])
    hidden = backbone.run_layers(states, exit_layer, backbone.num_layers, pe, positions, cache.base, mask)
    return backbone.logits(hidden)[0], states


class Verifier:
    """The deep layers' pass over a proposal, and the caches' rollback to what acceptance kept.

    A proposal's nodes: node 0 is the last committed token, node i its i-th proposed token (of a chain or a copy:
    the i-th in line; of a tree: the tree's node i, whose context is the path above it).
    ``logits`` gives what still lacks its shallow pass that pass (a chain: its newest token; a copy: every token, as
    no model pass has seen them; a tree: nothing, drafting gave every node its pass), then runs layers [ℓ, L) once
    over every pending token: logits [k + 1, V], row i after node i.
    ``keep(path)`` then keeps the accepted path (nodes 0, …) in every cache: a chain is cut, a tree's path gathered;
    and the adapter's cache follows (the exit states it has not read wait for its next call).
    """

    def __init__(self, backbone: Backbone, exit_layer: int, cache: KangarooCache):
        self.backbone, self.exit_layer, self.cache = backbone, exit_layer, cache
        self._start = 0  # deep cache length before the round: node 0's slot
        self._states: torch.Tensor | None = None  # [1, k + 1, H] exit states of the verified nodes, node order
        self._proposal = Proposal([])

    def logits(self, last_token: int, proposal: Proposal) -> torch.Tensor:  # [k + 1, V]
        device = self.backbone.embed_tokens.weight.device
        self._start, self._proposal = self.cache.deep_len, proposal
        tree = proposal.tree
        if tree is None:
            tokens = [last_token, *proposal.tokens] if proposal.copied else [(proposal.tokens or [last_token])[-1]]
            shallow_step(self.backbone, self.exit_layer, self.cache, torch.tensor([tokens], device=device))
            logits, self._states = deep_logits(self.backbone, self.exit_layer, self.cache)  # [k + 1, V], [1, k + 1, H]
            return logits
        order = tree.shallow_order  # the nodes in the order of their cache entries
        positions, allowed, key_positions = tree.attention(order, order, self._start, self._start, device)
        logits, states = deep_logits(
            self.backbone, self.exit_layer, self.cache, positions=positions, mask=TreeAttention(allowed, key_positions)
        )
        rows = torch.tensor(sorted(range(len(order)), key=order.__getitem__), device=device)  # node i -> its row
        self._states = states[:, rows]
        return logits[rows]

    def keep(self, path: list[int]) -> None:
        """Keep the nodes of ``path`` (0, then accepted nodes, each the child of the one before) in every cache; the
        adapter's cache follows ``cache.unread_after``."""
        states, tree = self._states, self._proposal.tree
        if tree is None:  # a chain: the path is 0..n, the caches are cut after it
            self.cache.rollback(self._start + path[-1] + 1, states[:, : path[-1] + 1])
        else:  # a tree: gather the path's entries (slot of node i = its place in the shallow order)
            device = states.device
            slot = {node: i for i, node in enumerate(tree.shallow_order)}
            base_keep = torch.cat([torch.arange(self._start), self._start + torch.tensor([slot[n] for n in path])])
            slots = [tree.adapter_slot[n] for n in path if n in tree.adapter_slot]
            adapter_keep = torch.cat([torch.arange(tree.adapter_slot[0]), torch.tensor(slots)])
            self.cache.gather(base_keep.to(device), adapter_keep.to(device), states[:, path])
        self._states, self._proposal = None, Proposal([])
