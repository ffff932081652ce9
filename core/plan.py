"""The step plan: what one engine step computes, decided by the scheduler, run by every rank."""

from __future__ import annotations

from dataclasses import dataclass


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
