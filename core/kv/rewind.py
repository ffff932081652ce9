"""Ragged rewinds of a decode batch: each row forgets its last few tokens.

Speculative decoding feeds every row of a batch its last token and its draft tokens at once,
end-padded to one length; afterwards each row drops its rejected drafts and the filler, a
different count per row. The batched caches are left-padded, each row's last token at the
shared write index: a rewind trims the count all rows share, then shifts each row with more
to drop right by the rest, its left padding growing over the slots that wrap round (masked
from then on), so that offsets, left padding and write index stay consistent and the cache
behaves as if the dropped tokens had never been fed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import (
    BatchKVCache,
    BatchRotatingKVCache,
    CacheList,
    KVCache,
    QuantizedKVCache,
    RotatingKVCache,
)

from mlxserve.core.kv.caches import kind_of
from mlxserve.core.kv.quantized import BatchQuantizedCache, QuantizedCache

# What the family caches batch into (chunked ones are KVCache and BatchKVCache subclasses),
# and those batches. Recurrent state (ArraysCache) folds every token into a fixed-size state
# that no trim can unfold; a model's own caches are unknown.
_REWINDABLE = (
    KVCache,
    QuantizedCache,
    RotatingKVCache,
    BatchKVCache,
    BatchQuantizedCache,
    BatchRotatingKVCache,
)


def unrewindable(cache: Sequence[Any]) -> list[str]:
    """The kinds among ``cache`` (a model's caches, or their batches) that :func:`rewind`
    cannot rewind exactly; none: the model can speculate."""
    found: set[str] = set()
    for layer_cache in cache:
        if isinstance(layer_cache, CacheList):
            found.update(unrewindable(layer_cache.caches))
        elif isinstance(layer_cache, QuantizedKVCache) and not isinstance(
            layer_cache, QuantizedCache
        ):
            found.add("quantized")  # mlx-lm's own: it does not batch
        elif not isinstance(layer_cache, _REWINDABLE):
            found.add(kind_of(layer_cache))
    return sorted(found)


def rewind(cache: list[Any], counts: Sequence[int]) -> None:
    """Drop the last ``counts[i]`` tokens of row i from every layer's batched cache, in place.

    Raises ValueError, changing nothing, if some layer cannot: a kind :func:`unrewindable`
    names, or a sliding window that no longer holds what a row would need (see
    :func:`_window_loses`; never so right after a forward pass of more tokens than any count).
    """
    drop = [int(n) for n in counts]
    if not any(drop):
        return
    if min(drop) < 0:
        raise ValueError(f"cannot rewind a negative number of tokens: {drop}")
    layers = list(_leaves(cache))
    for layer_cache in layers:
        if not isinstance(layer_cache, (BatchKVCache, BatchQuantizedCache, BatchRotatingKVCache)):
            raise ValueError(f"cannot rewind a {type(layer_cache).__name__} batch")
        held = 0 if layer_cache.keys is None else _length(layer_cache)
        if max(drop) > held:
            raise ValueError(f"cannot drop {drop} tokens of a batch of {held}")
        if isinstance(layer_cache, BatchRotatingKVCache) and _window_loses(layer_cache, drop):
            raise ValueError(
                f"a sliding-window cache no longer holds what its rows need after dropping {drop}"
            )
    for layer_cache in layers:
        if isinstance(layer_cache, BatchRotatingKVCache):
            _rewind_window(layer_cache, drop)
        else:
            _rewind_padded(layer_cache, drop)


def unrotate(cache: Sequence[Any]) -> None:
    """Before a forward pass of several tokens a row: put rotated sliding windows in time
    order, as their update would first do anyway.

    mlx-lm's ``BatchRotatingKVCache.make_mask`` for several tokens takes a rotated buffer's
    write index for its length, and so masks the oldest kept token of every row whose left
    padding is still inside the window (decode steps of one token, then a verification).
    """
    for layer_cache in _leaves(cache):
        if isinstance(layer_cache, BatchRotatingKVCache) and layer_cache.rotated:
            layer_cache._temporal_order()


def _leaves(cache: Sequence[Any]) -> Iterator[Any]:
    for layer_cache in cache:
        if isinstance(layer_cache, CacheList):
            yield from _leaves(layer_cache.caches)
        else:
            yield layer_cache


def _shift_rows(x: mx.array, shifts: mx.array, end: int) -> mx.array:
    """``x`` (B, H, slots, D) with each row's first ``end`` slots rolled right by its shift."""
    slot = mx.arange(x.shape[2])
    index = mx.where(slot < end, (slot - shifts[:, None]) % end, slot)
    return mx.take_along_axis(x, index[:, None, :, None], axis=2)


def _rewind_padded(cache: BatchKVCache | BatchQuantizedCache, drop: list[int]) -> None:
    """Full, latent, chunked and quantized batches: all of every row's tokens are kept."""
    common = min(drop)
    cache._idx -= common
    cache.offset = cache.offset - mx.array(drop)
    if max(drop) == common:
        return
    shifts = mx.array([n - common for n in drop])
    if isinstance(cache, BatchQuantizedCache):  # (packed, scales, biases) each
        assert cache.keys is not None and cache.values is not None
        cache.keys = tuple(_shift_rows(x, shifts, cache._idx) for x in cache.keys)
        cache.values = tuple(_shift_rows(x, shifts, cache._idx) for x in cache.values)
    else:
        plain: Any = cache  # mlx-lm types its keys and values as None
        plain.keys = _shift_rows(plain.keys, shifts, cache._idx)
        plain.values = _shift_rows(plain.values, shifts, cache._idx)
    cache.left_padding = cache.left_padding + shifts


def _length(cache: BatchKVCache | BatchQuantizedCache | BatchRotatingKVCache) -> int:
    """How many slots of the buffer hold tokens (in time order once a window is unrotated)."""
    keys: Any = cache.keys
    if isinstance(cache, BatchRotatingKVCache) and cache.rotated:
        return int(keys.shape[2])
    return cache._idx


def _window_loses(cache: BatchRotatingKVCache, drop: list[int]) -> bool:
    """Whether dropping ``drop`` would leave some row fewer tokens than its next window needs.

    A row's next token sees its last ``max_size - 1`` tokens. The buffer holds, for a row
    whose older tokens rotated away, its last ``max_size - 1 + S`` tokens after a forward pass
    of S > 1 tokens (mlx-lm's ``_update_concat``), but only ``max_size`` after single-token
    steps: dropping up to S - 1 is always exact, dropping more only for rows that are whole.
    """
    length = _length(cache)
    if length - max(drop) >= cache.max_size - 1:
        return False
    counts = mx.array(drop)
    held = length - mx.maximum(cache.left_padding, 0)  # the row's tokens in the buffer
    needed = mx.minimum(cache.offset - counts, cache.max_size - 1)
    return bool(mx.any(held - counts < needed).item())


def _rewind_window(cache: BatchRotatingKVCache, drop: list[int]) -> None:
    """Sliding windows: put the buffer in time order, then trim and shift it as a full cache.

    The result is the state ``merge`` makes (unrotated, write index = written = length), so
    mlx-lm's next single- or multi-token update and its masks carry on from it unchanged.
    """
    cache._temporal_order()
    length = _length(cache) - min(drop)
    shifts = mx.array([n - min(drop) for n in drop])
    keys: Any = cache.keys
    values: Any = cache.values
    keys, values = keys[..., :length, :], values[..., :length, :]
    if max(drop) > min(drop):
        keys, values = _shift_rows(keys, shifts, length), _shift_rows(values, shifts, length)
    cache.keys, cache.values = keys, values
    # Slots before 0 (rotated away) need no mask: the rows' windows never reach back there.
    cache.left_padding = mx.maximum(cache.left_padding, 0) + shifts
    cache.offset = cache.offset - mx.array(drop)
    cache._idx = cache._offset = length
