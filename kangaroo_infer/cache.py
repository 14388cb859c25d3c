"""The three KV caches of Kangaroo decoding and the exit states waiting to enter them.

One transformers ``DynamicCache`` holds every base layer; the shallow layers [0, ℓ) run ahead of the deep layers
[ℓ, L) while drafting, so the two halves have different lengths until verification. A second ``DynamicCache`` holds
the adapter's attention layers (one per adapter block), which may lag behind: it only ever needs the exit states of
committed tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache


@dataclass
class KangarooCache:
    exit_layer: int
    num_layers: int
    base: DynamicCache = field(default_factory=DynamicCache)
    adapter: DynamicCache = field(default_factory=DynamicCache)
    # Exit states (inputs of layer ℓ) of tokens that the shallow layers have seen and the deep layers not yet.
    deep_pending: list[torch.Tensor] = field(default_factory=list)  # each [1, q, H]
    # Exit states of committed tokens that the adapter has not seen yet (e.g. a fully accepted draft's last token).
    adapter_pending: list[torch.Tensor] = field(default_factory=list)  # each [1, q, H]

    @property
    def shallow_len(self) -> int:
        return self.base.get_seq_length(0)

    @property
    def deep_len(self) -> int:
        return self.base.get_seq_length(self.exit_layer)

    @property
    def adapter_len(self) -> int:
        return self.adapter.get_seq_length(0)

    def take_deep_pending(self) -> torch.Tensor:  # [1, m, H]
        states = torch.cat(self.deep_pending, dim=1) if len(self.deep_pending) > 1 else self.deep_pending[0]
        self.deep_pending = []
        return states

    def take_adapter_pending(self, newest: torch.Tensor) -> torch.Tensor:  # [1, a + q, H]
        """The adapter's pending exit states followed by ``newest`` ([1, q, H]); the pending list is emptied."""
        states = torch.cat([*self.adapter_pending, newest], dim=1) if self.adapter_pending else newest
        self.adapter_pending = []
        return states

    def rollback(self, length: int, new_exits: torch.Tensor | None) -> None:
        """Keep only positions [0, length) in every cache after a verification.

        ``new_exits`` ([1, q, H]) are the exit states of the last q kept tokens, needed when the adapter has not seen
        them (a fully accepted draft's last token; every token a lookup round committed): they are queued for its
        next call.
        """
        for idx in range(self.num_layers):
            self.base.layers[idx].crop(min(0, length - self.base.get_seq_length(idx)))
        adapter_len = self.adapter_len
        if adapter_len > length:
            self.adapter.crop(length - adapter_len)  # every adapter layer (one per block)
        elif adapter_len < length:
            missing = length - adapter_len
            pending = sum(s.shape[1] for s in self.adapter_pending)
            if new_exits is None or missing != pending + new_exits.shape[1]:
                raise RuntimeError(f"adapter cache out of step: {adapter_len} cached, {pending} pending, {length} kept")
            self.adapter_pending.append(new_exits)

    def gather(self, base_keep: torch.Tensor, adapter_keep: torch.Tensor) -> None:
        """Keep only the listed cache entries, in that order (the accepted path of a verified tree).

        ``base_keep`` indexes every base layer (shallow and deep hold the same entries after a tree verification),
        ``adapter_keep`` the adapter's cache. Keys/values are gathered, never recomputed.
        """
        for layer in self.base.layers:
            layer.keys = layer.keys.index_select(-2, base_keep)
            layer.values = layer.values.index_select(-2, base_keep)
        for layer in self.adapter.layers:
            layer.keys = layer.keys.index_select(-2, adapter_keep)
            layer.values = layer.values.index_select(-2, adapter_keep)

    def crop(self, length: int, adapter_length: int) -> None:
        """Forget everything past ``length`` base entries and ``adapter_length`` adapter entries, pending states
        included: back to an earlier point of the same sequence (e.g. to time the same step repeatedly)."""
        for layer in self.base.layers:
            layer.crop(length - layer.get_seq_length())
        self.adapter.crop(adapter_length - self.adapter_len)
        self.deep_pending, self.adapter_pending = [], []
