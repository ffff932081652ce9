"""Continuous batching: who waits, who prefills which chunk, who decodes, who is done."""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Callable, Collection

from mlxserve.core.engine.plan import PrefillChunk, StepPlan
from mlxserve.core.engine.sequence import RequestOutput, Sequence, Status, TokenLogprob
from mlxserve.core.kv.blocks import BlockManager, block_hashes
from mlxserve.core.sampling.constraint import GrammarError

log = logging.getLogger(__name__)
Save = tuple[str, tuple[tuple[int, str], ...]]  # a finished sequence's full blocks to keep


class Scheduler:
    """Admits waiting sequences as batch slots free up and plans each step.

    Each step decodes every running sequence and prefills prompt chunks of up to
    ``prefill_step_size`` tokens in all, so a long prompt never stalls running streams for
    more than one chunk. Whole short prompts that arrive together are prefilled as one batch.

    With ``lanes`` > 1 the sequences are split into that many micro-batches (lanes), each
    planned on its own by :meth:`schedule`; a new sequence joins the least busy lane.

    A model with recurrent layers (``snapshots`` > 0) can reuse cached blocks only up to a
    block where its recurrent state was copied: each prompt's prefill stops at its last whole
    block (the most a repeat of it may reuse), the runner copies the state there, and when the
    sequence ends that copy is kept with the block; the ``snapshots`` most recently used are
    kept, the others forgotten (their KV blocks stay for attention, but no longer end a reuse).

    A sequence that scores its prompt (``prompt_logprobs``) takes no cached prefix: cached
    blocks hold keys and values, not the log probabilities of their tokens, so its whole
    prompt is run again. Its KV blocks still join the prefix cache for others when it ends
    (but no recurrent-state snapshot: its prefill is cut into the same chunks every time).
    """

    def __init__(
        self,
        max_batch_size: int,
        prefill_step_size: int,
        blocks: BlockManager | None = None,
        prefix_salt: str | None = None,
        from_disk: Callable[[str, Collection[str]], bool] | None = None,
        lanes: int = 1,
        snapshots: int = 0,
    ) -> None:
        self.max_batch_size = max_batch_size
        self.prefill_step_size = prefill_step_size
        self.blocks = blocks
        self.prefix_salt = prefix_salt  # None: no prefix caching
        self.from_disk = from_disk
        self.lanes = lanes
        self.to_save: list[list[Save]] = [[] for _ in range(lanes)]
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []
        self.running: list[Sequence] = []
        self.to_release: list[list[str]] = [[] for _ in range(lanes)]
        self.admitting = True
        self.snapshots = snapshots
        self.with_state: OrderedDict[str, None] = OrderedDict()  # blocks ending a reuse, LRU
        self.keep_states: list[list[tuple[str, str]]] = [[] for _ in range(lanes)]
        self.drop_states: list[str] = []
        self.to_rewind: list[list[tuple[str, int]]] = [[] for _ in range(lanes)]

    @property
    def num_active(self) -> int:
        return len(self.prefilling) + len(self.running)

    def has_work(self, lane: int | None = None) -> bool:
        """Whether there is anything to plan (in ``lane``, or in any lane)."""
        if lane is None:
            return any(self.has_work(lane) for lane in range(self.lanes))
        return (
            bool(self.to_release[lane])
            or any(s.lane == lane for s in (*self.running, *self.prefilling))
            or (self.admitting and bool(self.waiting) and self._may_admit(lane))
        )

    def _active(self, lane: int) -> int:
        return sum(s.lane == lane for s in (*self.running, *self.prefilling))

    def _may_admit(self, lane: int) -> bool:
        """Room in the batch, and ``lane`` is (one of) the least busy."""
        if self.num_active >= self.max_batch_size:
            return False
        mine = self._active(lane)
        return all(mine <= self._active(other) for other in range(self.lanes))

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def find(self, request_id: str) -> Sequence | None:
        for queue in (self.running, self.prefilling, self.waiting):
            for seq in queue:
                if seq.request_id == request_id:
                    return seq
        return None

    def schedule(self, lane: int = 0) -> StepPlan:
        """The next step of ``lane``: call again only once its results are in."""
        release, self.to_release[lane] = tuple(self.to_release[lane]), []
        save, self.to_save[lane] = tuple(self.to_save[lane]), []
        keep_states, self.keep_states[lane] = tuple(self.keep_states[lane]), []
        rewind, self.to_rewind[lane] = tuple(self.to_rewind[lane]), []
        while self.admitting and self.waiting and self._may_admit(lane):
            if not self._reserve(self.waiting[0]):
                break
            seq = self.waiting.popleft()
            seq.status, seq.lane = Status.PREFILLING, lane
            self.prefilling.append(seq)
        running = [s for s in self.running if s.lane == lane]
        evict = tuple(self.blocks.take_evicted()) if self.blocks else ()
        for block_hash in evict:
            self.with_state.pop(block_hash, None)
        drop_states, self.drop_states = tuple(self.drop_states), []
        return StepPlan(
            lane=lane,
            release=release,
            save=save,
            evict=evict,
            decode_ids=tuple(s.request_id for s in running),
            decode_tokens=tuple(s.last_token for s in running),
            prefill=self._prefill_groups(lane),
            keep_states=keep_states,
            drop_states=drop_states,
            decode_drafts=tuple(s.draft for s in running) if any(s.draft for s in running) else (),
            rewind=rewind,
        )

    def _reserve(self, seq: Sequence) -> bool:
        """Take the KV blocks ``seq`` may need, reusing cached ones; False if they don't fit."""
        if self.blocks is None:
            return True
        reused: list[str] = []
        if self.prefix_salt is not None:
            hashes = block_hashes(seq.prompt_ids, self.blocks.block_size, self.prefix_salt)
            at_most = (len(seq.prompt_ids) - 1) // self.blocks.block_size  # one must be run
            if seq.scores_prompt:  # nor a snapshot: its chunks are the same every time
                at_most = 0
            reused = self.blocks.cached_prefix(hashes)[:at_most]
            if self.snapshots:
                reused = self._up_to_a_snapshot(reused)
                self._plan_snapshot(seq, hashes, at_most, len(reused))
            from_disk = self.from_disk
            if from_disk is not None:
                for block_hash in hashes[len(reused) : at_most]:
                    if not from_disk(block_hash, frozenset(reused)):
                        break
                    reused.append(block_hash)
        total = len(seq.prompt_ids) + seq.max_tokens
        if not self.blocks.can_reserve(total, reused):
            return False
        seq.reservation = self.blocks.reserve(total, reused)
        seq.reused = tuple(reused)
        seq.cached_tokens = seq.num_prefilled = len(reused) * self.blocks.block_size
        return True

    def _up_to_a_snapshot(self, reused: list[str]) -> list[str]:
        """The cached run cut back to its last block that has a recurrent-state snapshot."""
        for end in range(len(reused), 0, -1):
            if reused[end - 1] in self.with_state:
                self.with_state.move_to_end(reused[end - 1])
                return reused[:end]
        return []

    def _plan_snapshot(self, seq: Sequence, hashes: list[str], at_most: int, reused: int) -> None:
        """Copy the state at the prompt's last whole block, unless that copy exists already."""
        if at_most > reused and hashes[at_most - 1] not in self.with_state:
            seq.snapshot = (
                at_most * self.blocks.block_size if self.blocks else 0,
                hashes[at_most - 1],
            )

    def _prefill_groups(self, lane: int) -> tuple[tuple[PrefillChunk, ...], ...]:
        budget = self.prefill_step_size
        fresh: list[PrefillChunk] = []
        singles: list[tuple[PrefillChunk, ...]] = []
        for seq in self.prefilling:
            if seq.lane != lane:
                continue
            if budget <= 0:
                break
            size = min(seq.prompt_remaining, budget)
            start = seq.num_prefilled
            snapshot = ""
            if seq.snapshot is not None and start < seq.snapshot[0] <= start + size:
                size, snapshot = seq.snapshot[0] - start, seq.snapshot[1]
            chunk = PrefillChunk(
                seq.request_id,
                tuple(seq.prompt_ids[start : start + size]),
                start,
                last=size == seq.prompt_remaining,
                reused=seq.reused if start == seq.cached_tokens else (),
                snapshot=snapshot,
            )
            budget -= size
            longest = max([size, *(len(c.tokens) for c in fresh)])
            if start == 0 and chunk.last and (len(fresh) + 1) * longest <= self.prefill_step_size:
                fresh.append(chunk)
            else:
                singles.append((chunk,))
        return ((tuple(fresh),) if fresh else ()) + tuple(singles)

    def postprocess(
        self,
        plan: StepPlan,
        seqs: list[Sequence],
        tokens: list[int | Exception],
        logprobs: list[TokenLogprob | None],
    ) -> list[tuple[Sequence, RequestOutput]]:
        """Account for a step's results; the output of every sequence that sampled a token.

        ``seqs`` are those of ``plan.sample_ids`` still alive (one may have been aborted
        while its step ran), in that order. A sequence whose token could not be sampled (an
        exception in ``tokens``), or whose token could not be turned into text, ends with
        an error; the others go on.
        """
        self.prefilled(plan)
        return [
            (seq, self.advance_or_fail(seq, token, logprob))
            for seq, token, logprob in zip(seqs, tokens, logprobs, strict=True)
        ]

    def prefilled(self, plan: StepPlan) -> None:
        """Account for ``plan``'s prefill chunks: prompts that are in join the decode batch."""
        by_id = {s.request_id: s for s in self.prefilling}
        for group in plan.prefill:
            for chunk in group:
                seq = by_id.get(chunk.request_id)
                if seq is None:
                    continue
                seq.num_prefilled += len(chunk.tokens)
                if chunk.last:
                    self.prefilling.remove(seq)
                    seq.status = Status.RUNNING
                    self.running.append(seq)

    def rewound(self, seq: Sequence, count: int) -> None:
        """``seq``'s caches forget their last ``count`` tokens (rejected drafts, padding)
        first thing in its lane's next step."""
        if count:
            self.to_rewind[seq.lane].append((seq.request_id, count))

    def advance_or_fail(
        self, seq: Sequence, token: int | Exception, logprob: TokenLogprob | None
    ) -> RequestOutput:
        """``seq`` takes ``token``; its output (its last, with an error, if it cannot)."""
        try:
            if isinstance(token, Exception):
                raise token
            if seq.max_tokens == 0:
                return self._scored(seq)
            return self._advance(seq, token, logprob)
        except Exception as exc:
            return self.fail(seq, exc)

    def fail(self, seq: Sequence, exc: Exception) -> RequestOutput:
        """End ``seq`` alone with the error ``exc``; its last output."""
        grammar = isinstance(exc, GrammarError)  # the request's own grammar: no traceback
        if grammar:
            log.warning("request %s ended: %s", seq.request_id, exc)
        else:
            log.error("request %s failed; the others go on", seq.request_id, exc_info=exc)
        if seq.status != Status.FINISHED:
            self.finish(seq, "error")
        return RequestOutput(
            seq.request_id,
            finish_reason="error",
            error=str(exc) if grammar else f"{type(exc).__name__}: {exc}",
            usage=seq.usage(),
            error_kind="grammar" if grammar else None,
        )

    def _scored(self, seq: Sequence) -> RequestOutput:
        """A sequence that asked for no token ends once its prompt is scored."""
        self.finish(seq, "length")
        return RequestOutput(
            seq.request_id,
            finish_reason="length",
            usage=seq.usage(),
            prompt_logprobs=self._hand_over_prompt_logprobs(seq),
        )

    @staticmethod
    def _hand_over_prompt_logprobs(seq: Sequence) -> tuple[TokenLogprob, ...] | None:
        """The prompt's log probabilities, on a scoring sequence's first output only."""
        if not seq.scores_prompt or len(seq.output_ids) > 1:
            return None
        scored, seq.prompt_logprobs = tuple(seq.prompt_logprobs), []
        return scored

    def _advance(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> RequestOutput:
        thinking = seq.thinking
        if thinking is not None and thinking.inside:
            chosen = thinking.choose(token, seq.eos_ids)
            if chosen != token:  # the end of the thinking, forced: not what was sampled
                token, logprob = chosen, None
        seq.append(token)
        if seq.constraint is not None:
            seq.constraint.consume(token)
        elif thinking is not None and thinking.inside:
            seq.constraint = thinking.see(token)
        params = seq.params
        reason: str | None
        if token in params.stop_token_ids or (token in seq.eos_ids and not params.ignore_eos):
            text, reason = seq.text.finish(), "stop"
        else:
            text = seq.text.add(token)
            complete = seq.constraint is not None and seq.constraint.done
            if complete:  # only end-of-sequence may follow: no need to sample it
                text += seq.text.finish()
            reason = "stop" if seq.text.stopped or complete else None
            if reason is None and len(seq.output_ids) >= seq.max_tokens:
                text, reason = text + seq.text.finish(), "length"
        if reason:
            self.finish(seq, reason)
        return RequestOutput(
            seq.request_id,
            text=text,
            token_ids=(token,),
            logprobs=(logprob,) if logprob else (),
            finish_reason=reason,
            usage=seq.usage() if reason else None,
            stop_sequence=seq.text.stopped_by,
            prompt_logprobs=self._hand_over_prompt_logprobs(seq),
        )

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence wherever it is; its caches are released at the next step.

        A sequence that was decoding leaves its full KV blocks in the prefix cache, and so
        does one ended part way through its prompt: a client that gave up on a long prefill
        and asks again (as agents do after their timeout) takes up where it left off.
        """
        if seq.reservation is not None:
            assert self.blocks is not None  # a reservation is of the block manager's blocks
            full: list[str] = []
            if self.prefix_salt is not None:
                full = block_hashes(self._computed(seq), self.blocks.block_size, self.prefix_salt)
            added = set(self.blocks.release(seq.reservation, full))
            if added:
                blocks = tuple((i, h) for i, h in enumerate(full) if h in added)
                self.to_save[seq.lane].append((seq.request_id, blocks))
            if seq.snapshot is not None and seq.snapshot[1] in full:
                self._keep_snapshot(seq)
            seq.reservation = None
        if seq.status == Status.WAITING:
            self.waiting.remove(seq)
        else:
            queue = self.running if seq.status == Status.RUNNING else self.prefilling
            queue.remove(seq)
            self.to_release[seq.lane].append(seq.request_id)
        seq.status = Status.FINISHED
        seq.finish_reason = reason

    @staticmethod
    def _computed(seq: Sequence) -> list[int]:
        """The tokens whose keys and values ``seq``'s caches hold."""
        if seq.status == Status.RUNNING:
            return (seq.prompt_ids + seq.output_ids)[: seq.num_tokens - 1]
        if seq.status == Status.PREFILLING and seq.num_prefilled < len(seq.prompt_ids):
            return seq.prompt_ids[: seq.num_prefilled]
        return []

    def _keep_snapshot(self, seq: Sequence) -> None:
        assert seq.snapshot is not None and self.blocks is not None
        block_hash = seq.snapshot[1]
        cached = block_hash in self.blocks.in_use or block_hash in self.blocks.idle
        if not cached or block_hash in self.with_state:
            return
        self.with_state[block_hash] = None
        self.keep_states[seq.lane].append((seq.request_id, block_hash))
        while len(self.with_state) > self.snapshots:
            oldest, _ = self.with_state.popitem(last=False)
            self.drop_states.append(oldest)

    def drain(self) -> list[Sequence]:
        """Every sequence, ended or not, for when the model goes away or fails."""
        seqs = [*self.running, *self.prefilling, *self.waiting]
        if self.blocks is not None:
            for seq in seqs:
                if seq.reservation is not None:
                    self.blocks.release(seq.reservation, [])
                    seq.reservation, seq.reused = None, ()
                    seq.num_prefilled = seq.cached_tokens = 0
        self.running, self.prefilling, self.waiting = [], [], deque()
        self.to_release = [[] for _ in range(self.lanes)]
        self.to_save = [[] for _ in range(self.lanes)]
        self.to_rewind = [[] for _ in range(self.lanes)]
        return seqs
