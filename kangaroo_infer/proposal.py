"""What a round verifies, and the two methods every drafter has.

A drafter offers how many tokens it could propose now (``offer``), proposes them when the scheduler picks it
(``propose``) and hears what the round committed (``observe``). The adapter's chain (``draft.AdapterChain``), its
tree (``tree.AdapterTree``), prompt lookup (``lookup.Lookup``) and the plain step (``NoDraft``) all do; the loop in
``rounds.py`` knows them only through this protocol and the scheduler only through their names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from .scheduler import PLAIN

ADAPTER, LOOKUP = "adapter", "lookup"  # the drafters' names, as the scheduler and the outputs know them


@dataclass
class Tree:
    """Draft nodes of a tree proposal; node 0 is the root (the last committed token)."""

    tokens: list[int]
    parents: list[int]
    depths: list[int]
    scores: list[float]  # cumulative draft log-probability
    ancestors: torch.Tensor  # [capacity, capacity] bool: ancestors[i, j] = j is i or an ancestor of i
    children: dict[tuple[int, int], int] = field(default_factory=dict)  # (parent, token) -> node
    shallow_order: list[int] = field(default_factory=list)  # nodes in the order of their shallow-cache entries
    adapter_slot: dict[int, int] = field(default_factory=dict)  # node -> index in the adapter cache

    @classmethod
    def rooted_at(cls, token: int, capacity: int) -> Tree:
        ancestors = torch.zeros(capacity, capacity, dtype=torch.bool)
        ancestors[0, 0] = True
        return cls([token], [-1], [0], [0.0], ancestors)

    def add(self, parent: int, token: int, score: float) -> int:
        node = len(self.tokens)
        self.tokens.append(token)
        self.parents.append(parent)
        self.depths.append(self.depths[parent] + 1)
        self.scores.append(score)
        self.ancestors[node] = self.ancestors[parent]
        self.ancestors[node, node] = True
        self.children[(parent, token)] = node
        return node

    @property
    def num_drafts(self) -> int:
        return len(self.tokens) - 1

    def attention(
        self, queries: list[int], columns: list[int], prefix: int, root_pos: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mask pieces for ``queries`` over a cache of ``prefix`` committed entries followed by the nodes ``columns``.

        A node sits at position root_pos + depth. Returns query positions [q], allowed [q, prefix + len(columns)]
        (every committed entry, plus the node's ancestors and itself) and key positions [prefix + len(columns)].
        """
        q_idx = torch.tensor(queries, dtype=torch.long)
        c_idx = torch.tensor(columns, dtype=torch.long)
        depths = torch.tensor(self.depths)
        allowed = torch.ones(len(queries), prefix + len(columns), dtype=torch.bool)
        allowed[:, prefix:] = self.ancestors[q_idx][:, c_idx]
        key_positions = torch.cat([torch.arange(prefix), root_pos + depths[c_idx]])
        return (root_pos + depths[q_idx]).to(device), allowed.to(device), key_positions.to(device)


@dataclass
class Proposal:
    """The tokens a drafter proposes for one round, after the last committed token."""

    tokens: list[int]  # d_1..d_k
    q: torch.Tensor | None = None  # [k, V] the distributions they were drawn from (sampled drafts); None: point masses
    copied: bool = False  # lookup copies: no model pass has seen them yet
    tree: Tree | None = None  # tree drafts: tokens are its nodes 1..n, each with the path above it as context

    @property
    def steps(self) -> int:
        """Draft steps it took: a chain's length, a tree's depth."""
        return max(self.tree.depths) if self.tree is not None else len(self.tokens)


class Drafter(Protocol):
    """A candidate generator for the round loop."""

    name: str | None  # the scheduler's name for it (PLAIN for the plain step)
    free: bool  # its drafts cost nothing to make (copies): the scheduler prices only their verification
    fanout: tuple[int, int] | None  # a tree: (children per level K, node cap N); else None

    def offer(self, limit: int) -> int:
        """The most tokens (draft steps) it could propose now, at most ``limit``; 0: nothing to offer."""
        ...

    def propose(self, last_token: int, steps: int) -> Proposal:
        """Up to ``steps`` draft steps after ``last_token`` (the newest committed token)."""
        ...

    def observe(self, committed: list[int]) -> None:
        """The tokens the round (or the prefill) committed, in order."""
        ...


class NoDraft:
    """The plain step: proposes nothing, so the round is one forward of the full model."""

    name, free, fanout = PLAIN, True, None

    def offer(self, limit: int) -> int:
        return 0

    def propose(self, last_token: int, steps: int) -> Proposal:
        return Proposal([])

    def observe(self, committed: list[int]) -> None:
        pass
