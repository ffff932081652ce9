"""The prefix cache's KV blocks of one model stage, by block hash, and the disk tier under them.

The scheduler's BlockManager (blocks.py) decides which blocks are cached, reused and evicted;
this store holds their keys and values on each rank: blocks copied out of finished sequences,
blocks evicted to the disk tier (disk_tier.py) or read back from it, and fresh caches filled
from cached blocks. Its disk tier's counters (reads, writes, failures, ...) are the metrics'.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import ArraysCache, CacheList, RotatingKVCache

from mlxserve.core.kv.disk_tier import BlockData, BlockSpec, DiskTier

log = logging.getLogger(__name__)


STATE_KINDS = (ArraysCache, RotatingKVCache)


def kv_parts(cache: Sequence[Any]) -> list[Any]:
    """The caches whose keys and values are kept block by block: every layer's plain cache,
    the plain caches inside composite ones; not recurrent state or sliding windows."""
    parts = []
    for layer_cache in cache:
        if isinstance(layer_cache, CacheList):
            parts.extend(kv_parts(layer_cache.caches))
        elif not isinstance(layer_cache, STATE_KINDS):
            parts.append(layer_cache)
    return parts


def state_parts(cache: Sequence[Any]) -> list[Any]:
    """The caches copied whole at chosen blocks: recurrent state, which has no per-token
    blocks, and sliding windows, whose blocks rotate away."""
    return [c for c in cache if isinstance(c, STATE_KINDS)]


def snapshot(cache: Sequence[Any]) -> list[Any]:
    """A copy of the recurrent state and sliding windows of one sequence's caches."""
    return [
        _copied(c.cache) if isinstance(c, ArraysCache) else tuple(_copied(c.state))
        for c in state_parts(cache)
    ]


def _copied(values: Sequence[Any]) -> list[Any]:
    # New array objects: a slice assignment to the cache's arrays must not reach the copy.
    return [mx.array(v) if isinstance(v, mx.array) else v for v in values]


class PrefixStore:
    """KV blocks by hash (``blocks``), and the optional disk tier (``disk``) under them.

    ``probe_spec`` tells each layer's keys and values shape and dtype for one block; it is
    asked once, the first time a block is read back from disk.
    """

    def __init__(self, block_size: int, probe_spec: Callable[[], BlockSpec]) -> None:
        self.block_size = block_size
        self.blocks: dict[str, BlockData] = {}
        # Recurrent state and sliding windows after a block, for the blocks where copied.
        self.states: dict[str, list[Any]] = {}
        self.disk: DiskTier | None = None
        self.write_all_to_disk = False
        self._probe_spec = probe_spec
        self._block_spec: BlockSpec | None = None
        self._probed = False

    def save(self, finished: Sequence[tuple[list[Any], Sequence[tuple[int, str]]]]) -> None:
        """Copy full blocks out of finished sequences' caches: for each, its per-layer caches
        and its ``(block index, block hash)`` pairs to keep."""
        kept = []
        for caches, blocks in finished:
            for index, block_hash in blocks:
                part = slice(index * self.block_size, (index + 1) * self.block_size)
                self.blocks[block_hash] = [
                    (mx.contiguous(c.keys[..., part, :]), mx.contiguous(c.values[..., part, :]))
                    for c in kv_parts(caches)
                ]
                kept.append((block_hash, self.blocks[block_hash]))
        if kept:
            mx.eval([data for _, data in kept])
        if self.disk is not None and self.write_all_to_disk:
            for block_hash, data in kept:
                self.disk.write(block_hash, data)

    def evict(self, block_hashes: Sequence[str]) -> None:
        """Drop blocks the scheduler evicted; with a disk tier, they are written to it."""
        for block_hash in block_hashes:
            self.states.pop(block_hash, None)
            data = self.blocks.pop(block_hash, None)
            if data is not None and self.disk is not None:
                self.disk.write(block_hash, data)

    def discard(self, block_hash: str) -> None:
        """Forget one block (not written anywhere)."""
        self.blocks.pop(block_hash, None)
        self.states.pop(block_hash, None)

    def clear(self) -> None:
        """Forget every block in memory (the disk tier keeps its own)."""
        self.blocks.clear()
        self.states.clear()

    def restore(self, reused: Sequence[str], cache: list[Any]) -> list[Any]:
        """``cache`` (fresh caches) made to hold the KV of the cached blocks ``reused`` (and
        the recurrent state copied after the last of them)."""
        for part, kv in enumerate(kv_parts(cache)):
            kv.keys = mx.concatenate([self.blocks[h][part][0] for h in reused], 2)
            kv.values = mx.concatenate([self.blocks[h][part][1] for h in reused], 2)
            kv.offset = kv.keys.shape[2]
        whole = state_parts(cache)
        if whole:
            for layer_cache, state in zip(whole, self.states[reused[-1]], strict=True):
                if isinstance(layer_cache, ArraysCache):
                    layer_cache.cache = _copied(state)
                else:
                    layer_cache.state = tuple(_copied(state))
        return cache

    def keep_state(self, block_hash: str, snapshot: list[Any]) -> None:
        """Keep a sequence's recurrent state copied after ``block_hash``."""
        if block_hash in self.blocks:
            self.states[block_hash] = snapshot

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
                self._block_spec = self._probe_spec()
            except Exception as exc:
                log.warning("the shapes of KV blocks are unknown: %s", exc)
        return self._block_spec

    def spill_to_disk(self) -> int:
        """Queue every block of the prefix cache for the disk tier (at a graceful stop); how
        many were queued (those on disk or queued already are not counted)."""
        if self.disk is None:
            return 0
        return sum(
            self.disk.write(block_hash, data, even_if_behind=True)
            for block_hash, data in self.blocks.items()
        )
