"""Quantized KV caches that continuous batching can merge, extend and filter.

mlx-lm's ``QuantizedKVCache`` holds one sequence; the engine prefills each sequence on its
own and then merges it into the running batch, so this module adds the batch form: the
quantized keys and values are tuples (packed weights, scales, biases), left-padded like
mlx-lm's ``BatchKVCache``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import mlx.core as mx
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import QuantizedKVCache, _BaseCache

from mlxserve.core.errors import UnsupportedModelError

# Quantized vectors: (packed weights, scales, biases).
Quantized = tuple[mx.array, ...]


def fitting_group_size(dim: int, wanted: int) -> int:
    """The quantization group size to use for vectors of ``dim``: ``wanted`` if it divides it."""
    for size in (wanted, 64, 32):
        if dim % size == 0:
            return size
    raise UnsupportedModelError(
        f"[kv_cache] bits needs a head dimension divisible by 32, and this model's is {dim}: "
        "leave bits unset for it"
    )


class QuantizedCache(QuantizedKVCache):
    """mlx-lm's quantized cache of one sequence, mergeable into a batch."""

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> Any:
        if self.keys is None:
            self.group_size = fitting_group_size(
                min(keys.shape[-1], values.shape[-1]), self.group_size
            )
        return super().update_and_fetch(keys, values)

    @classmethod
    def merge(cls, caches: Sequence[QuantizedKVCache]) -> BatchQuantizedCache:
        return BatchQuantizedCache.merge(caches)


def _pad(parts: Quantized, left: int, right: int) -> Quantized:
    if not (left or right):
        return parts
    return tuple(mx.pad(x, [(0, 0), (0, 0), (left, right), (0, 0)]) for x in parts)


class BatchQuantizedCache(_BaseCache):
    """Quantized keys and values of a left-padded batch of sequences."""

    step = 256

    def __init__(self, left_padding: Sequence[int], group_size: int, bits: int) -> None:
        self.keys: Quantized | None = None
        self.values: Quantized | None = None
        self.left_padding = mx.array(list(left_padding))
        self.offset = mx.array([-p for p in left_padding])
        self._idx = 0
        self.group_size = group_size
        self.bits = bits

    def _quantize(self, x: mx.array) -> Quantized:
        return mx.quantize(x, group_size=self.group_size, bits=self.bits)

    def _grow(self, old: Quantized | None, new: Quantized, steps: int) -> Quantized:
        def grown(current: mx.array | None, part: mx.array) -> mx.array:
            room = mx.zeros((*part.shape[:2], steps, part.shape[3]), dtype=part.dtype)
            if current is None:
                return room
            return mx.concatenate([current[..., : self._idx, :], room], axis=2)

        return tuple(grown(None if old is None else old[i], new[i]) for i in range(3))

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Quantized, Quantized]:
        count, start = keys.shape[2], self._idx
        if self.keys is None:
            self.group_size = fitting_group_size(
                min(keys.shape[-1], values.shape[-1]), self.group_size
            )
        new_keys, new_values = self._quantize(keys), self._quantize(values)
        kept_keys, kept_values = self.keys, self.values
        if kept_keys is None or kept_values is None or start + count > kept_keys[0].shape[2]:
            steps = (self.step + count - 1) // self.step * self.step
            kept_keys = self.keys = self._grow(kept_keys, new_keys, steps)
            kept_values = self.values = self._grow(kept_values, new_values, steps)
        for stored, new in ((kept_keys, new_keys), (kept_values, new_values)):
            for i in range(3):
                stored[i][..., start : start + count, :] = new[i]
        self._idx += count
        self.offset = self.offset + count
        return self.keys_and_values()

    def keys_and_values(self) -> tuple[Quantized, Quantized]:
        def upto(parts: Quantized) -> Quantized:
            return tuple(x[..., : self._idx, :] for x in parts)

        assert self.keys is not None and self.values is not None, "the cache is empty"
        return upto(self.keys), upto(self.values)

    def make_mask(self, N: int, return_array: bool = False, **kwargs: Any) -> mx.array:
        return create_causal_mask(N, offset=self._idx, left_padding=self.left_padding, **kwargs)

    def prepare(self, *, left_padding: Sequence[int] | None = None, **_: Any) -> None:
        if left_padding is not None:
            assert self.keys is None, "left padding goes on an empty cache"
            padding = mx.array(list(left_padding))
            self.left_padding = self.left_padding + padding
            self.offset = self.offset - padding

    def finalize(self) -> None:
        pass

    def filter(self, batch_indices: mx.array) -> None:
        if self.keys is not None and self.values is not None:
            self.keys = tuple(x[batch_indices] for x in self.keys)
            self.values = tuple(x[batch_indices] for x in self.values)
        self.offset = self.offset[batch_indices]
        self.left_padding = self.left_padding[batch_indices]
        shift = min(cast("list[int]", self.left_padding.tolist()))
        if shift > 0:
            if self.keys is not None and self.values is not None:
                self.keys = tuple(x[..., shift:, :] for x in self.keys)
                self.values = tuple(x[..., shift:, :] for x in self.values)
            self._idx -= shift
            self.left_padding = self.left_padding - shift

    def extend(self, other: BatchQuantizedCache) -> None:
        if self.keys is None or other.keys is None:
            assert self.keys is None and other.keys is None, "cannot extend with an empty cache"
            self.left_padding = mx.concatenate([self.left_padding, other.left_padding])
            self.offset = mx.concatenate([self.offset, other.offset])
            return
        longest = max(self._idx, other._idx)

        def justified(cache: BatchQuantizedCache) -> tuple[Quantized, Quantized, mx.array]:
            assert cache.keys is not None and cache.values is not None
            left = longest - cache._idx
            keys = tuple(x[..., : cache._idx, :] for x in cache.keys)
            values = tuple(x[..., : cache._idx, :] for x in cache.values)
            return _pad(keys, left, 0), _pad(values, left, 0), cache.left_padding + left

        mine, theirs = justified(self), justified(other)
        self.keys = tuple(mx.concatenate([a, b]) for a, b in zip(mine[0], theirs[0], strict=True))
        self.values = tuple(mx.concatenate([a, b]) for a, b in zip(mine[1], theirs[1], strict=True))
        self.left_padding = mx.concatenate([mine[2], theirs[2]])
        self.offset = mx.concatenate([self.offset, other.offset])
        self._idx = longest

    @classmethod
    def merge(cls, caches: Sequence[QuantizedKVCache]) -> BatchQuantizedCache:
        first = caches[0]
        lengths = [c.offset for c in caches]
        longest = max(lengths)
        padding = [longest - n for n in lengths]
        batch = cls(padding, first.group_size, first.bits)
        if longest == 0:
            return batch

        def stacked(parts_of: list[Quantized]) -> Quantized:
            return tuple(
                mx.concatenate(
                    [
                        _pad(tuple(p[..., :n, :] for p in parts), pad, 0)[i]
                        for parts, n, pad in zip(parts_of, lengths, padding, strict=True)
                    ]
                )
                for i in range(3)
            )

        # mlx-lm types a QuantizedKVCache's keys and values as None: they are Quantized here
        batch.keys = stacked([cast(Quantized, c.keys) for c in caches])
        batch.values = stacked([cast(Quantized, c.values) for c in caches])
        batch.offset = batch.offset + longest
        batch._idx = longest
        return batch

    def size(self) -> int:
        return self._idx

    def empty(self) -> bool:
        return self.keys is None

    @property
    def state(self) -> tuple[Any, ...]:
        return self.keys, self.values, self.offset, self.left_padding

    @state.setter
    def state(self, v: tuple[Any, ...]) -> None:
        self.keys, self.values, self.offset, self.left_padding = v

    @property
    def nbytes(self) -> int:
        if self.keys is None or self.values is None:
            return 0
        return sum(x.nbytes for x in (*self.keys, *self.values))
