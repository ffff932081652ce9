"""Per-layer KV caches by kind: the building blocks family cache factories return."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Literal

import mlx.core as mx
from mlx_lm.models.cache import ArraysCache, CacheList, ChunkedKVCache, KVCache, RotatingKVCache

from mlxserve.core.distributed.cluster import available_memory
from mlxserve.core.kv.chunked import ChunkedCache
from mlxserve.core.kv.quantized import QuantizedCache
from mlxserve.core.model.stages import PipelineStage

log = logging.getLogger(__name__)

CacheKind = Literal["full", "sliding", "latent", "chunked", "recurrent", "composite", "other"]


@dataclass(frozen=True, slots=True)
class KVCacheOptions:
    """What the operator asked of the KV cache (``[kv_cache]`` in mlxserve.toml).

    ``bits`` = 4 or 8 quantizes keys and values; None keeps the model's precision.
    """

    bits: int | None = None
    group_size: int = 64

    def __post_init__(self) -> None:
        if self.bits not in (None, 4, 8):
            raise ValueError(f"KV cache bits must be 4 or 8 (got {self.bits})")


def kind_of(cache: Any) -> CacheKind:
    """The kind of a layer's cache, as mlx-lm's ``make_cache`` (or a family) made it."""
    if isinstance(cache, CacheList):
        return "composite"
    if isinstance(cache, ArraysCache):
        return "recurrent"
    if isinstance(cache, (ChunkedKVCache, ChunkedCache)):
        return "chunked"
    if isinstance(cache, RotatingKVCache):
        return "sliding"
    if isinstance(cache, KVCache):
        return "full"
    return "other"


def make_layer_cache(kind: CacheKind, options: KVCacheOptions, window: int | None = None) -> Any:
    """One layer's cache of a kind that needs nothing but a size.

    ``full`` keeps every key and value; ``sliding`` keeps the last ``window`` tokens;
    ``latent`` keeps a compressed latent per token (DeepSeek's MLA) in a plain cache.
    Quantization applies to ``full`` layers only; other kinds fall back to full precision.
    """
    if kind == "sliding":
        if window is None:
            raise ValueError("a sliding-window cache needs a window size")
        return RotatingKVCache(max_size=window)
    if kind == "full" and options.bits is not None:
        return QuantizedCache(group_size=options.group_size, bits=options.bits)
    return KVCache()


def servable(template: Any, kind: CacheKind, options: KVCacheOptions) -> Any:
    """The cache mlxserve serves a layer with, from the one mlx-lm's ``make_cache`` gives:
    quantized if asked and the layer is full attention, chunked attention in a kind that
    batches, anything else as it is (fresh, not shared with the template)."""
    if isinstance(template, CacheList):
        return CacheList(*(servable(c, kind_of(c), KVCacheOptions()) for c in template.caches))
    if isinstance(template, ChunkedKVCache):
        return ChunkedCache(template.chunk_size)
    if type(template) is KVCache:
        return make_layer_cache("full" if kind == "full" else "latent", options)
    if isinstance(template, RotatingKVCache):
        return RotatingKVCache(max_size=template.max_size, keep=template.keep)
    if isinstance(template, ArraysCache):
        return ArraysCache(len(template.cache))
    return copy.deepcopy(template)


def warn_unquantizable(kinds: list[CacheKind], options: KVCacheOptions, family: str) -> None:
    """Say once, visibly, when a requested KV quantization cannot apply to some layers."""
    skipped = sorted({k for k in kinds if k != "full"})
    if options.bits is not None and skipped:
        log.warning(
            "%s: %s KV caches are not quantized (kv_cache.bits = %d applies to full "
            "attention layers only); they keep full precision",
            family,
            " and ".join(skipped),
            options.bits,
        )


def _sizes(cache: Any) -> tuple[float, int]:
    """(bytes a token adds, bytes a sequence holds whatever its length) of a used cache."""
    if isinstance(cache, CacheList):
        parts = [_sizes(c) for c in cache.caches]
        return sum(p for p, _ in parts), sum(f for _, f in parts)
    if isinstance(cache, ArraysCache):
        return 0.0, cache.nbytes
    keys = getattr(cache, "keys", None)
    if isinstance(keys, (tuple, list)):
        keys = keys[0]
    if keys is None:
        return float(cache.nbytes), 0
    return cache.nbytes / keys.shape[2], 0


def cache_sizes(stage: PipelineStage, cache: list[Any]) -> tuple[int, int, int]:
    """(bytes per token, fixed bytes per sequence, bytes of full sliding windows) of
    ``stage``'s caches, measured on the fresh ``cache`` by one local forward pass of one token
    (no other rank takes part)."""
    tokens = mx.zeros((1, 1), mx.int32)
    out = stage.layout.forward(tokens, cache, stage.layers, hidden=stage.input_like(tokens))
    mx.eval(out, [c.state for c in cache])
    sizes = [_sizes(c) for c in cache]
    windows = sum(
        round(p * c.max_size)
        for c, (p, _) in zip(cache, sizes, strict=True)
        if kind_of(c) == "sliding"
    )
    return max(1, round(sum(p for p, _ in sizes))), sum(f for _, f in sizes), windows


def budget_tokens(kind: str, value: int, reserved_mb: int, per_token: int) -> int:
    """How many tokens of KV fit the budget: a token count, a size, or "auto" (free memory)."""
    if kind == "tokens":
        return value
    if kind == "bytes":
        return value // per_token
    return max(0, available_memory() - reserved_mb * 2**20) // per_token
