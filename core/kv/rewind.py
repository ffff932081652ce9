"""TEMPORARY (replaced by the helper's version)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache

from mlxserve.core.kv.caches import kind_of


def unrewindable(cache: Sequence[Any]) -> list[str]:
    return sorted({kind_of(c) for c in cache if kind_of(c) not in ("full", "latent")})


def rewind(cache: list[Any], counts: Sequence[int]) -> None:
    if not any(counts):
        return
    low = min(counts)
    shifts = [c - low for c in counts]
    for c in cache:
        assert isinstance(c, BatchKVCache)
        if low:
            c.trim(low)
        if any(shifts):
            shift = mx.array(shifts)
            idx = c._idx
            pos = mx.arange(idx)[None, :] - shift[:, None]
            pos = mx.maximum(pos, 0)
            k = c.keys[..., :idx, :]
            v = c.values[..., :idx, :]
            gather = pos[:, None, :, None]
            k = mx.take_along_axis(k, mx.broadcast_to(gather, k.shape), axis=2)
            v = mx.take_along_axis(v, mx.broadcast_to(gather, v.shape), axis=2)
            c.keys[..., :idx, :] = k
            c.values[..., :idx, :] = v
            c.left_padding = c.left_padding + shift
            c.offset = c.offset - shift
