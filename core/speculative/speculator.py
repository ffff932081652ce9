"""Drafting for a model's decoding sequences: what each proposes, and how much of it to send."""

from __future__ import annotations

import logging
from collections.abc import Sequence as Seq
from typing import Protocol

from mlxserve.core.engine.sequence import Sequence
from mlxserve.core.engine.settings import SpeculativeSettings
from mlxserve.core.speculative.ngram import NgramIndex
from mlxserve.core.speculative.policy import Acceptance, StepCost, longest_draft

log = logging.getLogger(__name__)
PAUSE_STEPS = 16  # steps without drafting after a drafting failure (doubling while they go on)
MAX_PAUSE_STEPS = 4096
EXPLORE_EVERY = 32  # steps between tries of a draft model that was not expected to pay


class Proposer(Protocol):
    """Where drafted tokens come from (the prompt and output so far, a draft model, …)."""

    def propose(self, seqs: Seq[Sequence], most: int) -> list[list[int]]:
        """Up to ``most`` tokens to follow each sequence's tokens so far."""
        ...

    def forget(self, request_id: str) -> None:
        """A sequence has ended: drop what is kept for it."""
        ...

    def kv_bytes_per_token(self) -> int:
        """The bytes of KV it keeps for each token of the sequences it drafts for (its share
        of the model's KV budget)."""
        ...


class NgramProposer:
    """Prompt lookup (see :mod:`ngram`): no model, nothing to run."""

    def __init__(self, n_min: int, n_max: int) -> None:
        self.n_min, self.n_max = n_min, n_max
        self.indexes: dict[str, NgramIndex] = {}

    def propose(self, seqs: Seq[Sequence], most: int) -> list[list[int]]:
        return [self._index(seq).propose(most) for seq in seqs]

    def _index(self, seq: Sequence) -> NgramIndex:
        index = self.indexes.get(seq.request_id)
        if index is None:
            index = self.indexes[seq.request_id] = NgramIndex(self.n_min, self.n_max)
            index.extend(seq.prompt_ids)
        index.extend(seq.output_ids[len(index.tokens) - len(seq.prompt_ids) :])
        return index

    def forget(self, request_id: str) -> None:
        self.indexes.pop(request_id, None)

    def kv_bytes_per_token(self) -> int:
        return 0


class Speculator:
    """Sets each decoding sequence's ``draft`` before its step, from its proposer, cut to
    what its grammar allows, and as long as pays (see :mod:`policy`); learns from what
    verification accepted. Tokens its grammar forces are drafted first, and always."""

    def __init__(
        self,
        settings: SpeculativeSettings,
        proposer: Proposer,
        cost: StepCost | None = None,
        drafting: StepCost | None = None,
    ) -> None:
        self.settings = settings
        self.method = settings.method
        self.proposer = proposer
        self.cost = cost or StepCost()
        self.drafting = drafting  # a draft model's cost of a step, by rows
        self.acceptance: dict[str, Acceptance] = {}
        self.drafted_tokens = self.accepted_tokens = 0
        self.failures = self.paused = self.idle_steps = 0

    def draft(self, seqs: Seq[Sequence], running: Seq[Sequence]) -> None:
        """Draft for ``seqs``: one lane's decoding sequences, of ``running`` in all."""
        if len(self.acceptance) > 2 * len(running) + 8:  # others have ended: forget them
            self._keep_only({s.request_id for s in running})
        if not seqs:
            return
        most = self.settings.num_draft_tokens
        room = [max(0, min(most, s.max_tokens - len(s.output_ids) - 1)) for s in seqs]
        asked = self._worth_asking(seqs, room)
        proposals = self.proposer.propose(seqs, asked) if asked else [[] for _ in seqs]
        rates = []
        for i, seq in enumerate(seqs):
            proposal, acceptance = proposals[i][: room[i]], self._acceptance(seq)
            forced = seq.constraint.forced()[: room[i]] if seq.constraint is not None else []
            if forced:  # certain: they teach nothing about the proposer
                proposal, rate = forced, 1.0
            else:
                if seq.constraint is not None:
                    proposal = proposal[: seq.constraint.allowed_prefix(proposal)]
                acceptance.proposed(proposal, seq.output_ids)
                rate = acceptance.rate
            proposals[i] = proposal
            rates.append(rate)
        longest = max(len(p) for p in proposals)
        if self.settings.adaptive and longest:
            available = [len(p) for p in proposals]
            longest = longest_draft(rates, available, self.cost, self.drafting)
        for seq, proposal in zip(seqs, proposals, strict=True):
            seq.draft = tuple(proposal[:longest])

    def _worth_asking(self, seqs: Seq[Sequence], room: list[int]) -> int:
        """How many tokens to ask the proposer for. A draft model's tokens cost a step of it
        each, so they are asked for only as far as they are expected to pay; when none would,
        one is asked for every ``EXPLORE_EVERY`` steps, to learn whether that has changed."""
        if self.drafting is None or not self.settings.adaptive:
            return max(room)
        rates = [self._acceptance(seq).rate for seq in seqs]
        asked = longest_draft(rates, room, self.cost, self.drafting)
        if asked:
            return asked
        self.idle_steps += 1
        if self.idle_steps < EXPLORE_EVERY:
            return 0
        self.idle_steps = 0
        return min(1, max(room))

    def draft_or_pause(self, seqs: Seq[Sequence], running: Seq[Sequence]) -> None:
        """:meth:`draft`, unless it failed lately: a failure clears the drafts (the step goes
        on as a plain one) and pauses drafting for a number of steps that doubles with each
        failure in a row, up to ``MAX_PAUSE_STEPS``."""
        if self.paused:
            self.paused -= 1
            for seq in seqs:
                seq.draft = ()
            return
        try:
            self.draft(seqs, running)
            self.failures = 0
        except Exception:
            self.failures += 1
            self.paused = min(MAX_PAUSE_STEPS, PAUSE_STEPS << (self.failures - 1))
            log.exception(
                "%s drafting failed; decoding goes on without it for %d steps",
                self.method,
                self.paused,
            )
            for seq in seqs:
                seq.draft = ()

    def _acceptance(self, seq: Sequence) -> Acceptance:
        acceptance = self.acceptance.get(seq.request_id)
        if acceptance is None:
            acceptance = self.acceptance[seq.request_id] = Acceptance()
        return acceptance

    def verified(self, drafted: int, accepted: int) -> None:
        """Count a sequence's drafted and accepted tokens of a step (for the metrics)."""
        self.drafted_tokens += drafted
        self.accepted_tokens += accepted

    def _keep_only(self, request_ids: set[str]) -> None:
        for request_id in [r for r in self.acceptance if r not in request_ids]:
            del self.acceptance[request_id]
            self.proposer.forget(request_id)
