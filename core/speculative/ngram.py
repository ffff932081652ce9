"""Prompt lookup: the continuation of the latest earlier occurrence of a sequence's last tokens.

Each sequence keeps an index from every n-gram it has seen (``n_min`` to ``n_max`` tokens) to
where its latest occurrence ends, grown as tokens arrive, so a lookup costs a few dictionary
reads however long the sequence is.
"""

from __future__ import annotations

from collections.abc import Sequence


class NgramIndex:
    """The n-grams of one sequence's tokens, by where their latest occurrence ends."""

    def __init__(self, n_min: int, n_max: int) -> None:
        self.n_min, self.n_max = n_min, n_max
        self.tokens: list[int] = []
        self.ends: dict[tuple[int, ...], int] = {}
        self._indexed = 0  # n-grams ending before this position are in ``ends``

    def extend(self, tokens: Sequence[int]) -> None:
        self.tokens.extend(tokens)

    def _catch_up(self) -> None:
        # The n-grams that end at the last token stay out: they are what is looked up.
        tokens, ends = self.tokens, self.ends
        for end in range(max(self._indexed, 1), len(tokens)):
            for n in range(self.n_min, min(self.n_max, end) + 1):
                ends[tuple(tokens[end - n : end])] = end
        self._indexed = max(self._indexed, len(tokens) - 1)

    def propose(self, most: int) -> list[int]:
        """Up to ``most`` tokens that followed the longest n-gram the tokens end with, at its
        latest earlier occurrence; none if no such n-gram occurred before."""
        if most <= 0 or len(self.tokens) < self.n_min:
            return []
        self._catch_up()
        tokens = self.tokens
        for n in range(min(self.n_max, len(tokens) - 1), self.n_min - 1, -1):
            end = self.ends.get(tuple(tokens[len(tokens) - n :]))
            if end is not None:
                return tokens[end : end + most]
        return []
