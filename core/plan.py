"""The step plan: what one engine step computes, decided by the scheduler, run by every rank."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class PrefillChunk:
    """Prompt tokens ``tokens`` of one sequence, starting at position ``start``.

    ``last`` means the chunk completes the prompt: the sequence then samples its first token
    and joins the decode batch. ``reused`` names the cached KV blocks (by hash) that hold the
    first ``start`` tokens, on a sequence's first chunk.
    """

    request_id: str
    tokens: tuple[int, ...]
    start: int
    last: bool
    reused: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class StepPlan:
    """One step: keep full blocks, free finished sequences, decode the batch, prefill chunks.

    ``save`` lists, per finished sequence, the (block index, hash) of the full KV blocks to
    keep in the prefix cache before its caches are freed; ``evict`` the cached blocks to drop.

    ``decode_ids`` is the decode batch in row order; ``prefill`` holds groups of chunks,
    each group run as one forward pass (several whole fresh prompts, or one chunk).
    Sequences whose prompt completes join the batch after the decode rows, in plan order.
    """

    release: tuple[str, ...] = ()
    save: tuple[tuple[str, tuple[tuple[int, str], ...]], ...] = ()
    evict: tuple[str, ...] = ()
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

    def to_json(self) -> dict[str, Any]:
        return {
            "release": list(self.release),
            "save": [[rid, [list(b) for b in blocks]] for rid, blocks in self.save],
            "evict": list(self.evict),
            "decode_ids": list(self.decode_ids),
            "decode_tokens": list(self.decode_tokens),
            "prefill": [
                [[c.request_id, list(c.tokens), c.start, c.last, list(c.reused)] for c in group]
                for group in self.prefill
            ],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StepPlan:
        return cls(
            release=tuple(data["release"]),
            save=tuple((rid, tuple((i, h) for i, h in blocks)) for rid, blocks in data["save"]),
            evict=tuple(data["evict"]),
            decode_ids=tuple(data["decode_ids"]),
            decode_tokens=tuple(data["decode_tokens"]),
            prefill=tuple(
                tuple(
                    PrefillChunk(rid, tuple(tokens), start, last, tuple(reused))
                    for rid, tokens, start, last, reused in group
                )
                for group in data["prefill"]
            ),
        )
