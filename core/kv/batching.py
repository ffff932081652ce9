"""Turning single-sequence caches into a batch and back, for every cache kind.

The runner merges the caches of sequences prefilled together (left-padded to one length)
and of sequences that join the decode batch; mlx-lm's cache kinds mostly know how, and this
fills in what they do not (recurrent state takes its padding as a mask, and forgets it once
the prompt is in).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mlx_lm.models.cache import ArraysCache, CacheList


def unbatchable(cache: Sequence[Any]) -> list[str]:
    """The cache classes among ``cache`` that cannot merge into a batch (none: it batches;
    a merged batch extends and filters)."""
    found = set()
    for layer_cache in cache:
        if not callable(getattr(layer_cache, "merge", None)):
            found.add(type(layer_cache).__name__)
        found.update(unbatchable(getattr(layer_cache, "caches", ())))
    return sorted(found)


def merge(caches: Sequence[Any]) -> Any:
    """One batched cache from the same layer's caches of several sequences."""
    return type(caches[0]).merge(list(caches))


def pad_left(cache: Any, padding: Sequence[int]) -> None:
    """Tell an empty batched cache that its rows' prompts are left-padded by ``padding``."""
    import mlx.core as mx

    if isinstance(cache, ArraysCache):
        cache.left_padding = mx.array(list(padding))
    elif isinstance(cache, CacheList):
        for child in cache.caches:
            pad_left(child, padding)
    else:
        cache.prepare(left_padding=list(padding))


def end_padding(cache: Any) -> None:
    """After a left-padded prefill: recurrent state forgets the padding (its mask would
    otherwise hide the next tokens); attention caches keep theirs for their masks."""
    if isinstance(cache, ArraysCache):
        cache.left_padding = None
        cache.lengths = None
    elif isinstance(cache, CacheList):
        for child in cache.caches:
            end_padding(child)
