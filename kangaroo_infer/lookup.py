"""Lookup drafting: propose the tokens that followed the latest earlier occurrence of the sequence's last n tokens.

Outputs often restate their prompt (summaries, answers about a document) or themselves (lists, code, the loops small
models fall into). Such text is drafted for free by copying: find the latest earlier place where the last n tokens
(n from ``max_ngram`` down to ``min_ngram``) occurred and propose what came after it. Verification is the same as
for the adapter's drafts, so the output is unchanged; only the cost of the wider verification is at stake, and the
scheduler (``scheduler.py``) decides per round whether a lookup draft is worth it. Under sampling a copied
token is a point-mass draft (``accept.py``), so copying keeps outputs exactly distributed.
"""

from __future__ import annotations

from .proposal import LOOKUP, Proposal


class NgramLookup:
    """An index from every n-gram of the sequence to the position right after its latest occurrence.

    The index grows with ``extend``; each token is indexed once, so a proposal costs a few dictionary lookups no
    matter how long the prompt is.
    """

    def __init__(self, tokens: list[int], min_ngram: int = 2, max_ngram: int = 3):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"lookup n-gram sizes must satisfy 1 <= min <= max; got min {min_ngram}, max {max_ngram}.")
        self.tokens = list(tokens)
        self.min_ngram, self.max_ngram = min_ngram, max_ngram
        self._next: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token that followed it last time
        self._indexed = 0  # n-grams ending before this index are in the table

    def extend(self, tokens: list[int]) -> None:
        self.tokens.extend(tokens)

    def propose(self, limit: int) -> list[int]:
        """Up to ``limit`` tokens continuing the sequence the way it continued after the latest earlier match of its
        longest suffix (``max_ngram`` first); [] when no suffix of ``min_ngram`` tokens or more occurred before."""
        tokens = self.tokens
        # Index the n-grams that end before the last token: those are the ones with a known continuation.
        for end in range(self._indexed, len(tokens) - 1):
            for n in range(self.min_ngram, min(self.max_ngram, end + 1) + 1):
                self._next[tuple(tokens[end - n + 1 : end + 1])] = end + 1
        self._indexed = max(self._indexed, len(tokens) - 1)
        if limit <= 0:
            return []
        for n in range(min(self.max_ngram, len(tokens)), self.min_ngram - 1, -1):
            start = self._next.get(tuple(tokens[-n:]))
            if start is not None:
                # Copy forward; a continuation that runs into the end of the sequence repeats its own period.
                out: list[int] = []
                for i in range(limit):
                    j = start + i
                    out.append(tokens[j] if j < len(tokens) else out[j - len(tokens)])
                return out
        return []


class Lookup:
    """Lookup as a drafter: ``offer`` makes the copy (free), ``propose`` hands out its first k tokens."""

    name, free, fanout = LOOKUP, True, None

    def __init__(self, prompt: list[int], max_tokens: int, min_ngram: int = 2, max_ngram: int = 3):
        self.index = NgramLookup(prompt, min_ngram, max_ngram)
        self.max_tokens = max_tokens
        self._copy: list[int] = []

    def offer(self, limit: int) -> int:
        self._copy = self.index.propose(min(self.max_tokens, limit))
        return len(self._copy)

    def propose(self, last_token: int, steps: int) -> Proposal:
        return Proposal(self._copy[:steps], copied=True)

    def observe(self, committed: list[int]) -> None:
        self.index.extend(committed)
