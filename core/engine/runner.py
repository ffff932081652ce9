"""Runs step plans on a model stage: per-sequence prefill caches and one decode batch."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from mlxserve.core.engine.plan import PrefillChunk, StepPlan
from mlxserve.core.kv.disk_tier import BlockSpec, DiskTier
from mlxserve.core.model.stages import PipelineStage

Cache = list[Any]
log = logging.getLogger(__name__)


def check_batchable(cache: Cache) -> None:
    """The engine batches sequences by merging their caches; refuse kinds that cannot merge."""
    for layer_cache in cache:
        if not hasattr(type(layer_cache), "merge"):
            raise ValueError(
                f"{type(layer_cache).__name__} cannot be batched; "
                "continuous batching needs caches that merge (full, sliding or latent)"
            )


@dataclass
class Lane:
    """One micro-batch's decode batch: its merged caches, and whose each row is."""

    cache: Cache | None = None
    rows: list[str] = field(default_factory=list)


class ModelRunner:
    """Holds the KV caches of one model stage and runs each step plan's forward passes.

    Each lane (micro-batch) of the plans has a decode batch of its own.
    """

    def __init__(
        self,
        stage: PipelineStage,
        make_cache: Callable[[], Cache],
        lockstep: bool = False,
        block_size: int = 16,
    ) -> None:
        self.stage = stage
        self.make_cache = make_cache
        self.block_size = block_size
        self.blocks: dict[str, list[tuple[mx.array, mx.array]]] = {}
        self.disk: DiskTier | None = None
        self.write_all_to_disk = False
        self._block_spec: BlockSpec | None = None
        self._probed = False
        # Across ranks, each forward pass's sends and receives must happen in plan order.
        self.lockstep = lockstep
        self.prefilling: dict[str, Cache] = {}
        self.lanes: dict[int, Lane] = {}

    def lane(self, index: int = 0) -> Lane:
        return self.lanes.setdefault(index, Lane())

    @property
    def rows(self) -> list[str]:
        """Every decoding sequence, lane by lane."""
        return [row for lane in self.lanes.values() for row in lane.rows]

    def run(self, plan: StepPlan) -> mx.array | None:
        """Run one step; the logits (one row per ``plan.sample_ids``), or None."""
        lane = self.lane(plan.lane)
        self._save(plan.save, lane)
        for block_hash in plan.evict:
            data = self.blocks.pop(block_hash, None)
            if data is not None and self.disk is not None:
                self.disk.write(block_hash, data)
        self.release(plan.release, plan.lane)
        assert list(plan.decode_ids) == lane.rows, "step plan and decode batch disagree"
        outputs = []
        if plan.decode_ids:
            tokens = mx.array(plan.decode_tokens)[:, None]
            outputs.append(self._sync(self.stage.forward(tokens, lane.cache))[:, -1])
        touched: list[Cache] = []
        for group in plan.prefill:
            logits, cache = self._prefill(group)
            self._sync(logits)
            if group[-1].last:
                outputs.append(logits[:, -1])
                self._join(lane, [c.request_id for c in group], cache)
            else:
                touched.append(cache)
        logits = mx.concatenate(outputs) if outputs else None
        mx.eval(logits, [[c.state for c in cache] for cache in touched])
        return logits

    def _sync(self, output: mx.array) -> mx.array:
        if self.lockstep:
            mx.eval(output)
        return output

    def release(self, request_ids: Sequence[str], lane_index: int = 0) -> None:
        """Drop the caches of finished or aborted sequences (of lane ``lane_index``)."""
        gone = set(request_ids)
        for request_id in gone:
            self.prefilling.pop(request_id, None)
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
        self.blocks.clear()
        self.lanes.clear()

    def _save(self, saves: Sequence[tuple[str, tuple[tuple[int, str], ...]]], lane: Lane) -> None:
        """Copy full blocks of finished sequences out of the batch, into the prefix cache."""
        kept = []
        for request_id, blocks in saves:
            row = lane.rows.index(request_id)
            caches = [layer_cache.extract(row) for layer_cache in lane.cache]
            for index, block_hash in blocks:
                part = slice(index * self.block_size, (index + 1) * self.block_size)
                self.blocks[block_hash] = [
                    (mx.contiguous(c.keys[..., part, :]), mx.contiguous(c.values[..., part, :]))
                    for c in caches
                ]
                kept.append((block_hash, self.blocks[block_hash]))
        if kept:
            mx.eval([data for _, data in kept])
        if self.disk is not None and self.write_all_to_disk:
            for block_hash, data in kept:
                self.disk.write(block_hash, data)

    def load_from_disk(self, block_hash: str) -> bool:
        """Bring a block back from the disk tier into the prefix cache; False if it can't."""
        if self.disk is None or not self.disk.has(block_hash):
            return False
        data = self.disk.read(block_hash, self.block_spec())
        if data is not None:
            self.blocks[block_hash] = data
        return data is not None

    def block_spec(self) -> BlockSpec | None:
        """Each layer's keys and values shape and dtype for one block of one sequence; None
        if the stage cannot tell (disk blocks are then checked by layers and length only)."""
        if not self._probed:
            self._probed = True
            try:
                self._block_spec = self._probe_block_spec()
            except Exception as exc:
                log.warning("the shapes of KV blocks are unknown: %s", exc)
        return self._block_spec

    def _probe_block_spec(self) -> BlockSpec:
        # A one-token forward pass that is never evaluated: MLX is lazy, so building its
        # graph gives the caches' shapes and dtypes without computing anything.
        layout, cache = self.stage.layout, self.make_cache()
        if self.stage.first:
            inputs = mx.zeros((1, 1), mx.int32)
        else:
            inputs = mx.zeros((1, 1, layout.hidden_size), layout.hidden_dtype)
        self.stage.forward(inputs, cache)

        def one_block(array: mx.array) -> tuple[tuple[int, ...], mx.Dtype]:
            batch, heads, _, *rest = array.shape
            return (batch, heads, self.block_size, *rest), array.dtype

        return [(one_block(c.keys), one_block(c.values)) for c in cache]

    def spill_to_disk(self) -> int:
        """Queue every block of the prefix cache for the disk tier (at a graceful stop); how
        many were queued (those on disk or queued already are not counted)."""
        if self.disk is None:
            return 0
        return sum(
            self.disk.write(block_hash, data, even_if_behind=True)
            for block_hash, data in self.blocks.items()
        )

    @property
    def disk_reads(self) -> int:
        return self.disk.reads if self.disk is not None else 0

    @property
    def disk_writes(self) -> int:
        return self.disk.writes if self.disk is not None else 0

    @property
    def disk_failures(self) -> int:
        return sum(self.disk.failures.values()) if self.disk is not None else 0

    @property
    def disk_dropped_writes(self) -> int:
        return self.disk.dropped_writes if self.disk is not None else 0

    @property
    def disk_rejected_blocks(self) -> int:
        return self.disk.rejected if self.disk is not None else 0

    @property
    def disk_write_retries(self) -> int:
        return self.disk.write_retries if self.disk is not None else 0

    @property
    def disk_enabled(self) -> bool | None:
        """Whether the disk tier reads and writes; None without one."""
        return self.disk.enabled if self.disk is not None else None

    @property
    def disk_writable(self) -> bool | None:
        """Whether the disk tier writes (a disk fault turns its writes off for a while); None
        without one."""
        return self.disk.writing if self.disk is not None else None

    def _restore(self, reused: Sequence[str]) -> Cache:
        """Fresh caches that already hold the KV of the cached blocks ``reused``."""
        cache = self.make_cache()
        for layer, layer_cache in enumerate(cache):
            layer_cache.keys = mx.concatenate([self.blocks[h][layer][0] for h in reused], 2)
            layer_cache.values = mx.concatenate([self.blocks[h][layer][1] for h in reused], 2)
            layer_cache.offset = layer_cache.keys.shape[2]
        return cache

    def _prefill(self, group: tuple[PrefillChunk, ...]) -> tuple[mx.array, Cache]:
        if len(group) == 1:
            chunk = group[0]
            cache = self.prefilling.pop(chunk.request_id, None)
            if cache is None:
                cache = self._restore(chunk.reused) if chunk.reused else self.make_cache()
            logits = self.stage.forward(mx.array([chunk.tokens]), cache)
            if chunk.last:
                return logits, [type(c).merge([c]) for c in cache]
            self.prefilling[chunk.request_id] = cache
            return logits, cache
        longest = max(len(c.tokens) for c in group)
        padding = [longest - len(c.tokens) for c in group]
        rows = [[0] * pad + list(c.tokens) for pad, c in zip(padding, group, strict=True)]
        tokens = mx.array(rows)
        per_layer = zip(*(self.make_cache() for _ in group), strict=True)
        cache = [type(caches[0]).merge(list(caches)) for caches in per_layer]
        for layer_cache in cache:
            layer_cache.prepare(left_padding=padding)
        return self.stage.forward(tokens, cache), cache

    def _join(self, lane: Lane, request_ids: list[str], cache: Cache) -> None:
        if lane.cache is None:
            lane.cache = cache
        else:
            for mine, theirs in zip(lane.cache, cache, strict=True):
                mine.extend(theirs)
        lane.rows.extend(request_ids)
