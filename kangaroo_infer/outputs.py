"""What ``KangarooModel.generate`` returns: the sequences and the per-round record of drafting and acceptance."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class GenerateOutput:
    sequences: torch.LongTensor  # [1, T + n]: prompt + new tokens ([B, T + n_max] for a batch)
    accept_lengths: list[int]  # tokens committed by each full-model forward (the prefill included); sum == n
    draft_lengths: list[int] = field(default_factory=list)  # drafts proposed in each round (prefill excluded)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    lookup_rounds: list[int] = field(default_factory=list)  # indices (into draft_lengths) of the rounds whose drafts
    # were copied by lookup drafting (lookup.py) instead of drafted by the adapter
    # For a batch (batch.py) accept_lengths, draft_lengths and lookup_rounds are lists per row: list[list[int]].

    @property
    def num_new_tokens(self) -> int:
        """New tokens (summed over the rows of a batch)."""
        return sum(sum(x) if isinstance(x, list) else x for x in self.accept_lengths)

    @property
    def tau(self) -> float:
        """Mean tokens committed per full-model forward (per row and forward, for a batch)."""
        forwards = sum(len(x) if isinstance(x, list) else 1 for x in self.accept_lengths)
        return self.num_new_tokens / max(forwards, 1)
