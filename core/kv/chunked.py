"""Chunked attention's caches (Llama 4): a token sees only the tokens of its own chunk.

mlx-lm's ``ChunkedKVCache`` trims keys older than a chunk and leaves the mask to the model,
which builds it from one offset for the whole batch; it cannot batch. These keep every key
(as a full cache does) and build the chunk mask themselves, per row of a batch, so sequences
at different positions batch exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, KVCache


def chunk_mask(
    queries: int, offset: int, chunk_size: int, left_padding: mx.array | None
) -> mx.array:
    """Which keys each query may see: causal, within its chunk, never padding.

    ``offset`` is the cache index of the first query; a row's positions start after its
    ``left_padding``. (queries, keys) for one sequence, (B, 1, queries, keys) for a batch.
    """
    q = mx.arange(offset, offset + queries)[:, None]
    k = mx.arange(offset + queries)[None, :]
    if left_padding is None:
        return (k <= q) & (q // chunk_size == k // chunk_size)
    pad = left_padding[:, None, None]
    qpos, kpos = q[None] - pad, k[None] - pad
    mask = (kpos >= 0) & (kpos <= qpos) & (qpos // chunk_size == kpos // chunk_size)
    return mask[:, None]


class ChunkedCache(KVCache):
    """One sequence's cache of a chunked-attention layer."""

    start_position = 0  # mlx-lm's model reads it; nothing is trimmed

    def __init__(self, chunk_size: int) -> None:
        super().__init__()
        self.chunk_size = chunk_size

    def maybe_trim_front(self) -> None:
        """Nothing to trim: every key stays, the mask keeps each token to its chunk."""

    def make_mask(self, N: int, return_array: bool = False, **kwargs: Any) -> mx.array:
        return chunk_mask(N, self.offset, self.chunk_size, None)

    @classmethod
    def merge(cls, caches: Sequence[Any]) -> BatchChunkedCache:
        if any(c.size() for c in caches):
            batch = BatchChunkedCache.merge(list(caches))
        else:  # mlx-lm's merge makes a plain batch cache of empty ones
            batch = BatchChunkedCache([0] * len(caches))
        batch.chunk_size = caches[0].chunk_size
        return batch


class BatchChunkedCache(BatchKVCache):
    """A batch of :class:`ChunkedCache` rows, left-padded like mlx-lm's ``BatchKVCache``."""

    start_position = 0
    chunk_size = 0

    def maybe_trim_front(self) -> None:
        """Nothing to trim (see :class:`ChunkedCache`)."""

    def make_mask(self, N: int, return_array: bool = False, **kwargs: Any) -> mx.array:
        return chunk_mask(N, self._idx, self.chunk_size, self.left_padding)

    def extract(self, idx: int) -> ChunkedCache:
        row = super().extract(idx)
        cache = ChunkedCache(self.chunk_size)
        cache.keys, cache.values, cache.offset = row.keys, row.values, row.offset
        return cache
