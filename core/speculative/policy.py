"""How many tokens each sequence drafts: from its recent acceptance and the measured cost of a
step that verifies that many tokens.

A verification step feeds every decode row the same number of positions (the longest draft,
shorter ones padded), so its cost is that of ``rows * (1 + longest)`` tokens. The longest
draft is chosen to maximise the tokens a step is expected to give per second; each row then
drafts up to it. A row accepts its j-th drafted token with probability ``acceptance ** j``
(each token taken as independent, at the rate it has been accepted lately).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

DECAY = 0.7  # weight of the history against a step's news in a sequence's acceptance


@dataclass(slots=True)
class Acceptance:
    """A sequence's recent acceptance of proposed tokens: a decayed count of the tokens that
    came true and of the proposals cut short by one that did not (a Beta(1, 1) prior before
    any).

    Every proposal is checked against the tokens that followed it, whether it was drafted or
    not: a sequence that stopped drafting because it did not pay keeps learning whether it
    would now (its first proposed token is checked against the next token it gets).
    """

    accepted: float = 0.0
    rejected: float = 0.0
    proposal: tuple[int, ...] = ()
    after: int = 0  # the sequence's output length when it was proposed

    @property
    def rate(self) -> float:
        return (self.accepted + 1) / (self.accepted + self.rejected + 2)

    def update(self, drafted: int, accepted: int) -> None:
        if drafted:
            self.accepted = DECAY * self.accepted + accepted
            self.rejected = DECAY * self.rejected + (accepted < drafted)

    def proposed(self, proposal: Sequence[int], output: Sequence[int]) -> None:
        """Check the last proposal against the tokens ``output`` got since; keep this one."""
        if self.proposal:
            came = output[self.after : self.after + len(self.proposal)]
            checked = min(len(came), len(self.proposal))
            true = next((i for i in range(checked) if came[i] != self.proposal[i]), checked)
            self.update(checked, true)
        self.proposal, self.after = tuple(proposal), len(output)


class StepCost:
    """Seconds a forward pass of ``n`` tokens takes, interpolated from measured points (None
    measured: every size is taken to cost the same, which makes drafting free)."""

    def __init__(self, points: Sequence[tuple[int, float]] = ()) -> None:
        self.sizes = [n for n, _ in sorted(points)]
        self.seconds = [s for _, s in sorted(points)]

    def __call__(self, n: int) -> float:
        sizes, seconds = self.sizes, self.seconds
        if not sizes:
            return 1.0
        if n <= sizes[0]:
            return seconds[0]
        i = min(bisect.bisect_left(sizes, n), len(sizes) - 1)
        lo, hi = i - 1, i
        slope = (seconds[hi] - seconds[lo]) / (sizes[hi] - sizes[lo])
        return max(seconds[0], seconds[lo] + slope * (n - sizes[lo]))


def longest_draft(
    rates: Sequence[float],
    available: Sequence[int],
    cost: StepCost,
    drafting: StepCost | None = None,
) -> int:
    """The longest draft of a step whose rows accept at ``rates`` and have ``available``
    tokens to draft: the one with the most expected tokens per second (0: do not draft).
    ``drafting`` is what proposing one token for a batch of that many rows costs (a draft
    model's step; None: nothing)."""
    rows = len(rates)
    best, best_speed = 0, rows / cost(rows)
    expected = float(rows)
    per_token = drafting(rows) if drafting is not None else 0.0
    for k in range(1, max(available, default=0) + 1):
        expected += sum(r**k for r, a in zip(rates, available, strict=True) if a >= k)
        speed = expected / (cost(rows * (1 + k)) + k * per_token)
        if speed > best_speed:
            best, best_speed = k, speed
    return best
