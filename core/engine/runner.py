"""Runs step plans on a model stage: per-sequence prefill caches and one decode batch."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

import mlx.core as mx

from mlxserve.core.engine.plan import PrefillChunk, StepPlan
from mlxserve.core.kv.batching import end_padding, merge, pad_left
from mlxserve.core.kv.disk_tier import BlockSpec
from mlxserve.core.kv.prefix_store import PrefixStore, kv_parts, snapshot
from mlxserve.core.kv.rewind import rewind, unrotate
from mlxserve.core.model.stages import PipelineStage

Cache = list[Any]


@dataclass
class Lane:
    """One micro-batch's decode batch: its merged caches, and whose each row is."""

    cache: Cache | None = None
    rows: list[str] = field(default_factory=list)


class ModelRunner:
    """Holds the KV caches of one model stage and runs each step plan's forward passes.

    Each lane (micro-batch) of the plans has a decode batch of its own. The prefix cache's
    blocks of this stage, and its disk tier, are in ``prefix_store``.
    """

    def __init__(
        self,
        stage: PipelineStage,
        make_cache: Callable[[], Cache],
        lockstep: bool = False,
        block_size: int = 16,
        batchable: bool = True,
    ) -> None:
        self.stage = stage
        self.make_cache = make_cache
        # Caches that cannot merge run one sequence at a time, as they are.
        self.batchable = batchable
        self.block_size = block_size
        self.prefix_store = PrefixStore(block_size, self._probe_block_spec)
        # Across ranks, each forward pass's sends and receives must happen in plan order.
        self.lockstep = lockstep
        self.prefilling: dict[str, Cache] = {}
        # Recurrent state copied where a sequence's prompt reached the block its plan named.
        self.snapshots: dict[str, list[Any]] = {}
        self.lanes: dict[int, Lane] = {}

    def lane(self, index: int = 0) -> Lane:
        return self.lanes.setdefault(index, Lane())

    @property
    def rows(self) -> list[str]:
        """Every decoding sequence, lane by lane."""
        return [row for lane in self.lanes.values() for row in lane.rows]

    def run(
        self, plan: StepPlan, scored: Collection[str] = ()
    ) -> tuple[mx.array | None, dict[str, mx.array]]:
        """Run one step: the logits to sample from (one row per ``plan.sample_ids``, or None;
        a decode row with drafted tokens has one row per position it verifies, see
        :func:`sample_rows`), and for the prefill chunks of the ``scored`` sequences the logits
        at every position of the chunk (L, V), unevaluated (for their prompt's log
        probabilities)."""
        lane = self.lane(plan.lane)
        self._rewind(plan.rewind, lane)
        self._save(plan.save, lane)
        for request_id, block_hash in plan.keep_states:
            self.prefix_store.keep_state(block_hash, self.snapshots.pop(request_id))
        for block_hash in plan.drop_states:
            self.prefix_store.states.pop(block_hash, None)
        self.prefix_store.evict(plan.evict)
        self.release(plan.release, plan.lane)
        assert list(plan.decode_ids) == lane.rows, "step plan and decode batch disagree"
        outputs = []
        if plan.decode_ids:
            assert lane.cache is not None  # the lane has rows, so it has their caches
            if plan.draft_width:
                outputs.append(self._verify(plan, lane.cache))
            else:
                tokens = mx.array(plan.decode_tokens)[:, None]
                outputs.append(self._sync(self.stage.forward(tokens, lane.cache))[:, -1])
        touched: list[Cache] = []
        every_position: dict[str, mx.array] = {}
        for group in plan.prefill:
            logits, cache = self._prefill(group)
            self._sync(logits)
            every_position.update(_chunk_rows(group, logits, scored))
            if group[-1].last:
                outputs.append(logits[:, -1])
                self._join(lane, [c.request_id for c in group], cache)
            else:
                touched.append(cache)
        sampled = mx.concatenate(outputs) if outputs else None
        mx.eval(sampled, [[c.state for c in cache] for cache in touched], self.snapshots)
        return sampled, every_position

    def _verify(self, plan: StepPlan, cache: Cache) -> mx.array:
        """Every decode row's token and drafts in one pass (padded to ``plan.draft_width`` by
        repeating its last token; the padding is rewound with the rejected drafts): the logits
        at each row's real positions, row after row."""
        width = plan.draft_width
        rows = [
            [token, *draft] + [(draft or (token,))[-1]] * (width - len(draft))
            for token, draft in zip(plan.decode_tokens, plan.decode_drafts, strict=True)
        ]
        unrotate(cache)  # mlx-lm masks a rotated sliding window wrongly for several tokens
        logits = self._sync(self.stage.forward(mx.array(rows), cache))
        at = [(i, j) for i, draft in enumerate(plan.decode_drafts) for j in range(len(draft) + 1)]
        return logits[mx.array([i for i, _ in at]), mx.array([j for _, j in at])]

    def _rewind(self, counts: Sequence[tuple[str, int]], lane: Lane) -> None:
        if not counts or lane.cache is None:
            return
        by_id = dict(counts)
        rewind(lane.cache, [by_id.get(row, 0) for row in lane.rows])

    def _sync(self, output: mx.array) -> mx.array:
        if self.lockstep:
            mx.eval(output)
        return output

    def release(self, request_ids: Sequence[str], lane_index: int = 0) -> None:
        """Drop the caches of finished or aborted sequences (of lane ``lane_index``)."""
        gone = set(request_ids)
        for request_id in gone:
            self.prefilling.pop(request_id, None)
            self.snapshots.pop(request_id, None)
        lane = self.lane(lane_index)
        keep = [i for i, r in enumerate(lane.rows) if r not in gone]
        if len(keep) == len(lane.rows):
            return
        lane.rows = [lane.rows[i] for i in keep]
        if not keep:
            lane.cache = None
        elif lane.cache is not None:
            indices = mx.array(keep)
            for layer_cache in lane.cache:
                layer_cache.filter(indices)

    def reset(self) -> None:
        self.prefilling.clear()
        self.snapshots.clear()
        self.prefix_store.clear()
        self.lanes.clear()

    def _save(self, saves: Sequence[tuple[str, tuple[tuple[int, str], ...]]], lane: Lane) -> None:
        """Copy full blocks of finished sequences out of the batch (or out of the caches of
        a prefill they ended part way), into the prefix cache."""
        finished = []
        for request_id, blocks in saves:
            part_way = self.prefilling.get(request_id)  # ended during its prompt's prefill
            if part_way is not None:
                finished.append((part_way, blocks))
                continue
            if request_id not in lane.rows:  # its prefill had run no chunk: nothing to copy
                continue
            row = lane.rows.index(request_id)  # a finished sequence is still in its lane's batch
            assert lane.cache is not None
            finished.append(([layer_cache.extract(row) for layer_cache in lane.cache], blocks))
        self.prefix_store.save(finished)

    def _probe_block_spec(self) -> BlockSpec:
        # A one-token forward pass that is never evaluated: MLX is lazy, so building its
        # graph gives the caches' shapes and dtypes without computing anything.
        cache, tokens = self.make_cache(), mx.zeros((1, 1), mx.int32)
        self.stage.layout.forward(
            tokens, cache, self.stage.layers, hidden=self.stage.input_like(tokens)
        )

        def one_block(array: mx.array) -> tuple[tuple[int, ...], mx.Dtype]:
            batch, heads, _, *rest = array.shape
            return (batch, heads, self.block_size, *rest), array.dtype

        return [(one_block(c.keys), one_block(c.values)) for c in kv_parts(cache)]

    def _prefill(self, group: tuple[PrefillChunk, ...]) -> tuple[mx.array, Cache]:
        if len(group) == 1:
            chunk = group[0]
            cache = self.prefilling.pop(chunk.request_id, None)
            if cache is None:
                cache = self.make_cache()
                if chunk.reused:
                    self.prefix_store.restore(chunk.reused, cache)
            logits = self.stage.forward(mx.array([chunk.tokens]), cache)
            if chunk.snapshot:
                self.snapshots[chunk.request_id] = snapshot(cache)
            if chunk.last:
                return logits, [merge([c]) for c in cache] if self.batchable else cache
            self.prefilling[chunk.request_id] = cache
            return logits, cache
        longest = max(len(c.tokens) for c in group)
        padding = [longest - len(c.tokens) for c in group]
        rows = [[0] * pad + list(c.tokens) for pad, c in zip(padding, group, strict=True)]
        tokens = mx.array(rows)
        per_layer = zip(*(self.make_cache() for _ in group), strict=True)
        cache = [merge(caches) for caches in per_layer]
        for layer_cache in cache:
            pad_left(layer_cache, padding)
        logits = self.stage.forward(tokens, cache)
        for layer_cache in cache:
            end_padding(layer_cache)
        return logits, cache

    def _join(self, lane: Lane, request_ids: list[str], cache: Cache) -> None:
        if lane.cache is None:
            lane.cache = cache
        else:
            for mine, theirs in zip(lane.cache, cache, strict=True):
                mine.extend(theirs)
        lane.rows.extend(request_ids)


def sample_rows(plan: StepPlan) -> list[tuple[int, int]]:
    """Where each of ``plan.sample_ids`` is in the logits :meth:`ModelRunner.run` gives:
    (first row, rows), one row per position it verifies."""
    drafts = plan.decode_drafts or ((),) * len(plan.decode_ids)
    sizes = [1 + len(d) for d in drafts] + [1] * len(plan.joining_ids)
    return list(zip(accumulate(sizes, initial=0), sizes, strict=False))


def _chunk_rows(
    group: tuple[PrefillChunk, ...], logits: mx.array, scored: Collection[str]
) -> dict[str, mx.array]:
    """The logits of each scored chunk of ``group``, its left padding cut off."""
    longest = logits.shape[1]
    return {
        chunk.request_id: logits[row, longest - len(chunk.tokens) :]
        for row, chunk in enumerate(group)
        if chunk.request_id in scored
    }
