"""The step plan: what one engine step computes, decided by the scheduler, run by every rank."""

from __future__ import annotations

from dataclasses import dataclass

from mlxserve.core.distributed.wire import Reader, Writer


@dataclass(frozen=True, slots=True)
class PrefillChunk:
    """Prompt tokens ``tokens`` of one sequence, starting at position ``start``.

    ``last`` means the chunk completes the prompt: the sequence then samples its first token
    and joins the decode batch. ``reused`` names the cached KV blocks (by hash) that hold the
    first ``start`` tokens, on a sequence's first chunk. ``snapshot`` names the block the
    chunk ends with when the sequence's recurrent state must be copied there (for the prefix
    cache of a model with recurrent layers; see scheduler.py).
    """

    request_id: str
    tokens: tuple[int, ...]
    start: int
    last: bool
    reused: tuple[str, ...] = ()
    snapshot: str = ""


@dataclass(frozen=True, slots=True)
class StepPlan:
    """One step: keep full blocks, free finished sequences, decode the batch, prefill chunks.

    ``save`` lists, per finished sequence, the (block index, hash) of the full KV blocks to
    keep in the prefix cache before its caches are freed; ``evict`` the cached blocks to drop.
    ``keep_states`` attaches a finished sequence's recurrent-state snapshot to a cached block
    (request id, block hash); ``drop_states`` forgets blocks' snapshots (their KV stays).

    ``decode_ids`` is the decode batch in row order; ``prefill`` holds groups of chunks,
    each group run as one forward pass (several whole fresh prompts, or one chunk).
    Sequences whose prompt completes join the batch after the decode rows, in plan order.

    ``lane`` names the micro-batch: on a pipeline, each lane is a batch of its own, and
    the ranks work on different lanes at once (see worker.py).

    Speculative decoding: ``decode_drafts`` (empty, or one per decode row) are tokens drafted
    after each row's ``decode_tokens``; a step with any verifies them all, feeding every row
    ``1 + draft_width`` positions (shorter drafts padded). ``rewind`` names the decode rows
    whose caches must first forget their last tokens (request id, count): the drafts of the
    lane's previous step that were rejected, and its padding.
    """

    lane: int = 0
    release: tuple[str, ...] = ()
    save: tuple[tuple[str, tuple[tuple[int, str], ...]], ...] = ()
    evict: tuple[str, ...] = ()
    decode_ids: tuple[str, ...] = ()
    decode_tokens: tuple[int, ...] = ()
    prefill: tuple[tuple[PrefillChunk, ...], ...] = ()
    keep_states: tuple[tuple[str, str], ...] = ()
    drop_states: tuple[str, ...] = ()
    decode_drafts: tuple[tuple[int, ...], ...] = ()
    rewind: tuple[tuple[str, int], ...] = ()

    @property
    def draft_width(self) -> int:
        """Draft positions each decode row is fed after its token (0: a plain decode step)."""
        return max((len(d) for d in self.decode_drafts), default=0)

    @property
    def joining_ids(self) -> tuple[str, ...]:
        return tuple(c.request_id for group in self.prefill for c in group if c.last)

    @property
    def sample_ids(self) -> tuple[str, ...]:
        """Whose next token this step samples, in the order of the logits rows."""
        return self.decode_ids + self.joining_ids

    def encode(self) -> bytes:
        out = Writer().uint(self.lane).texts(self.release).uint(len(self.save))
        for request_id, blocks in self.save:
            out.text(request_id).uints(i for i, _ in blocks).texts(h for _, h in blocks)
        out.texts(self.evict).texts(self.decode_ids).uints(self.decode_tokens)
        out.uint(len(self.prefill))
        for group in self.prefill:
            out.uint(len(group))
            for c in group:
                out.text(c.request_id).uints(c.tokens).uint(c.start).uint(c.last)
                out.texts(c.reused).text(c.snapshot)
        out.texts(r for r, _ in self.keep_states).texts(h for _, h in self.keep_states)
        out.texts(self.drop_states).uint(len(self.decode_drafts))
        for draft in self.decode_drafts:
            out.uints(draft)
        out.texts(r for r, _ in self.rewind).uints(n for _, n in self.rewind)
        return bytes(out.data)

    @classmethod
    def decode(cls, data: bytes) -> StepPlan:
        read = Reader(data)
        lane, release = read.uint(), read.texts()
        save = []
        for _ in range(read.uint()):
            request_id, indices, hashes = read.text(), read.uints(), read.texts()
            save.append((request_id, tuple(zip(indices, hashes, strict=True))))
        evict, decode_ids, decode_tokens = read.texts(), read.texts(), read.uints()
        prefill = tuple(
            tuple(_read_chunk(read) for _ in range(read.uint())) for _ in range(read.uint())
        )
        keep_states = tuple(zip(read.texts(), read.texts(), strict=True))
        drop_states = read.texts()
        drafts = tuple(read.uints() for _ in range(read.uint()))
        rewind = tuple(zip(read.texts(), read.uints(), strict=True))
        return cls(
            lane,
            release,
            tuple(save),
            evict,
            decode_ids,
            decode_tokens,
            prefill,
            keep_states,
            drop_states,
            drafts,
            rewind,
        )


def _read_chunk(read: Reader) -> PrefillChunk:
    request_id, tokens, start, last = read.text(), read.uints(), read.uint(), bool(read.uint())
    return PrefillChunk(request_id, tokens, start, last, read.texts(), read.text())
