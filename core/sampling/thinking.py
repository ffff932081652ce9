"""A sequence's thinking block, token by token: where it ends, how many tokens it may take,
and the grammar that waits for its end.

A thinking model whose prompt opens a reasoning block writes its reasoning first and closes
it with an end marker (``</think>``); only the answer after it is the request's output format.
:class:`Thinking` watches a sequence's tokens for the marker's ids; when a budget runs out
(or the model would end while an answer is still owed) it forces the marker's tokens in place
of the sampled ones, and once the marker is written it hands over the grammar.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from mlxserve.core.sampling.constraint import Constraint


def _started(tail: Sequence[int], marker: Sequence[int]) -> int:
    """How many of ``marker``'s first tokens ``tail`` ends with (short of all of them)."""
    for n in range(min(len(marker) - 1, len(tail)), 0, -1):
        if list(tail[-n:]) == list(marker[:n]):
            return n
    return 0


@dataclass
class Thinking:
    """One sequence's thinking block, open from its first generated token.

    Attributes:
        end_ids: the token ids of the marker that closes the block (non-empty).
        budget: the most thinking tokens before the marker is forced; None: no limit.
        grammar: the constraint the answer follows, applied once the block is closed; while
            it waits, an end-of-sequence token closes the block instead of ending the reply.
        spent: thinking tokens so far (the marker's own not counted).
    """

    end_ids: tuple[int, ...]
    budget: int | None = None
    grammar: Constraint | None = None
    spent: int = 0
    inside: bool = True
    _forcing: list[int] = field(default_factory=list)
    _tail: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.end_ids:
            raise ValueError("a thinking block needs the token ids of its end marker")

    def choose(self, sampled: int, eos_ids: Collection[int]) -> int:
        """The token to append: ``sampled``, or the end marker's next token when forced."""
        if not self.inside:
            return sampled
        if not self._forcing:
            over_budget = self.budget is not None and self.spent >= self.budget
            owes_answer = self.grammar is not None and sampled in eos_ids
            if not (over_budget or owes_answer):
                return sampled
            self._forcing = list(self.end_ids[_started(self._tail, self.end_ids) :])
        return self._forcing[0]

    @property
    def tokens(self) -> int:
        """The block's tokens so far, its end marker included once written."""
        return self.spent if self.inside else self.spent + len(self.end_ids)

    def see(self, token: int) -> Constraint | None:
        """Account for an appended token; the waiting grammar when it closes the block."""
        if not self.inside:
            return None
        if self._forcing and token == self._forcing[0]:
            self._forcing.pop(0)
        self._tail = (self._tail + [token])[-len(self.end_ids) :]
        self.spent += 1
        if self._tail != list(self.end_ids):
            return None
        self.inside = False
        self.spent -= len(self.end_ids)
        grammar, self.grammar = self.grammar, None
        return grammar
