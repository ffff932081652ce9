"""The step plan: what one engine step computes, decided by the scheduler, run by every rank."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class PrefillChunk:
    """Prompt tokens ``tokens`` of one sequence, starting at position ``start``.

    ``last`` means the chunk completes the prompt: the sequence then samples its first token
    and joins the decode batch.
    """

    request_id: str
    tokens: tuple[int, ...]
    start: int
    last: bool


@dataclass(frozen=True, slots=True)
class StepPlan:
    """One step: free finished sequences, decode the batch, prefill chunks.

    ``decode_ids`` is the decode batch in row order; ``prefill`` holds groups of chunks,
    each group run as one forward pass (several whole fresh prompts, or one chunk).
    Sequences whose prompt completes join the batch after the decode rows, in plan order.
    """

    release: tuple[str, ...] = ()
    decode_ids: tuple[str, ...] = ()
    decode_tokens: tuple[int, ...] = ()
    prefill: tuple[tuple[PrefillChunk, ...], ...] = ()

    @property
    def joining_ids(self) -> tuple[str, ...]:
        return tuple(c.request_id for group in self.prefill for c in group if c.last)

    @property
    def sample_ids(self) -> tuple[str, ...]:
        """Whose next token this step samples, in the order of the logits rows."""
        return self.decode_ids + self.joining_ids

    @property
    def computes(self) -> bool:
        return bool(self.decode_ids or self.prefill)

    def to_json(self) -> dict[str, Any]:
        return {
            "release": list(self.release),
            "decode_ids": list(self.decode_ids),
            "decode_tokens": list(self.decode_tokens),
            "prefill": [
                [[c.request_id, list(c.tokens), c.start, c.last] for c in group]
                for group in self.prefill
            ],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StepPlan:
        return cls(
            release=tuple(data["release"]),
            decode_ids=tuple(data["decode_ids"]),
            decode_tokens=tuple(data["decode_tokens"]),
            prefill=tuple(
                tuple(
                    PrefillChunk(rid, tuple(tokens), start, last)
                    for rid, tokens, start, last in group
                )
                for group in data["prefill"]
            ),
        )
