"""The three KV caches of Kangaroo decoding, the exit states waiting to enter them, and the one rule the adapter's
cache follows.

One transformers ``DynamicCache`` holds every base layer; the shallow layers [0, ℓ) run ahead of the deep layers
[ℓ, L) while drafting, so the two halves have different lengths until verification. A second ``DynamicCache`` holds
the adapter's attention layers (one per adapter block).

The adapter's cache lags. Between rounds it holds the base cache's slots except the newest m, whose exit states
wait in ``unread`` ([b, m, H], the same m for every row of a batch) and enter with the adapter's next call, ahead of
the state it drafts from. A round leaves m = (the most slots any row kept) − (the slots the adapter has read), at
least 0 (``unread_after``): a draft round whose chain was fully accepted leaves its last draft unread (m = 1), a
partly accepted one none (the adapter's entries of rejected drafts are cut), a plain step or a lookup round adds its
committed tokens to the queue. In a batch a row that kept fewer slots than another drops its newest adapter entries
to the common m and reads them again, so the rows stay aligned; that is why a batch's lookup round has the adapter
read its copies at verification (``batch.py``): the rows' unread tails could otherwise reach back past the states
kept for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache


def unread_after(
    known: torch.Tensor,  # [b, n, H] exit states of base slots [first, first + n), the same slots for every row
    first: int,
    ends: torch.Tensor,  # [b] each row keeps base slots [.., ends_b)
    adapter_len: int,  # slots the adapter has read (every row)
    limit: int,  # slots the cache will hold after the round (a batch drops padding every row has)
) -> torch.Tensor:  # [b, m, H]
    """The exit states the adapter leaves unread after a round: each row's newest m kept slots, with m the most any
    row kept beyond what the adapter read (the rule above)."""
    m = min(limit, max(0, int(ends.max()) - adapter_len))
    index = ends[:, None] - first - m + torch.arange(m, device=ends.device)  # [b, m] into known
    if m and int(index.min()) < 0:
        raise RuntimeError(f"adapter cache out of step: {m} unread slots, exit states kept from slot {first}")
    return known.gather(1, index[..., None].expand(-1, -1, known.shape[-1]))


@dataclass
class KangarooCache:
    """One prompt's caches."""

    exit_layer: int
    num_layers: int
    base: DynamicCache = field(default_factory=DynamicCache)
    adapter: DynamicCache = field(default_factory=DynamicCache)
    # Exit states (inputs of layer ℓ) of tokens that the shallow layers have seen and the deep layers not yet.
    deep_pending: list[torch.Tensor] = field(default_factory=list)  # each [1, q, H]
    unread: torch.Tensor | None = None  # [1, m, H] exit states of the newest m base slots, not yet in the adapter

    @property
    def shallow_len(self) -> int:
        return self.base.get_seq_length(0)

    @property
    def deep_len(self) -> int:
        return self.base.get_seq_length(self.exit_layer)

    @property
    def adapter_len(self) -> int:
        return self.adapter.get_seq_length(0)

    @property
    def unread_len(self) -> int:
        return 0 if self.unread is None else self.unread.shape[1]

    def take_deep_pending(self) -> torch.Tensor:  # [1, m, H]
        states = torch.cat(self.deep_pending, dim=1) if len(self.deep_pending) > 1 else self.deep_pending[0]
        self.deep_pending = []
        return states

    def take_unread(self, newest: torch.Tensor) -> torch.Tensor:  # [1, m + q, H]
        """The unread exit states followed by ``newest`` ([1, q, H]), for the adapter's next call; none stay unread."""
        states = newest if self.unread is None else torch.cat([self.unread, newest], dim=1)
        self.unread = None
        return states

    def rollback(self, length: int, kept: torch.Tensor) -> None:
        """Keep only base slots [0, length) after a verification; ``kept`` ([1, q, H]) are the exit states of the
        round's kept slots (the last q of them)."""
        for idx in range(self.num_layers):
            self.base.layers[idx].crop(min(0, length - self.base.get_seq_length(idx)))
        self.settle(kept)

    def gather(self, base_keep: torch.Tensor, adapter_keep: torch.Tensor, kept: torch.Tensor) -> None:
        """Keep only the listed cache entries, in that order (the accepted path of a verified tree).

        ``base_keep`` indexes every base layer (shallow and deep hold the same entries after a tree verification),
        ``adapter_keep`` the adapter's cache; ``kept`` ([1, q, H]) are the exit states of the path's q nodes.
        Keys/values are gathered, never recomputed.
        """
        for layer in self.base.layers:
            layer.keys = layer.keys.index_select(-2, base_keep)
            layer.values = layer.values.index_select(-2, base_keep)
        for layer in self.adapter.layers:
            layer.keys = layer.keys.index_select(-2, adapter_keep)
            layer.values = layer.values.index_select(-2, adapter_keep)
        self.settle(kept)

    def settle(self, kept: torch.Tensor) -> None:
        """The adapter's cache after a round (``unread_after``): cut back to the base's slots less the unread ones."""
        known = kept if self.unread is None else torch.cat([self.unread, kept], dim=1)  # the newest base slots
        length = self.shallow_len
        ends = torch.tensor([length], device=kept.device)
        unread = unread_after(known, length - known.shape[1], ends, self.adapter_len, length)
        self.adapter.crop(min(0, length - unread.shape[1] - self.adapter_len))
        self.unread = unread if unread.shape[1] else None

    def crop(self, length: int, adapter_length: int) -> None:
        """Forget everything past ``length`` base entries and ``adapter_length`` adapter entries, pending states
        included: back to an earlier point of the same sequence (e.g. to time the same step repeatedly)."""
        for layer in self.base.layers:
            layer.crop(length - layer.get_seq_length())
        self.adapter.crop(adapter_length - self.adapter_len)
        self.deep_pending, self.unread = [], None
