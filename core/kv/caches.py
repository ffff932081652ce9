"""Per-layer KV caches by kind: the building blocks family cache factories return."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import mlx.core as mx
from mlx_lm.models.cache import KVCache, RotatingKVCache

from mlxserve.core.distributed.cluster import available_memory
from mlxserve.core.kv.quantized import QuantizedCache
from mlxserve.core.model.stages import PipelineStage

log = logging.getLogger(__name__)

CacheKind = Literal["full", "sliding", "latent"]


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


def make_layer_cache(kind: CacheKind, options: KVCacheOptions, window: int | None = None) -> Any:
    """One layer's cache.

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


def bytes_per_token(stage: PipelineStage, cache: list[Any]) -> int:
    """KV bytes one token takes in ``stage``'s layers, measured on the fresh ``cache``.

    Runs each layer once on one zero hidden state, locally (no other rank takes part).
    """
    layout = stage.layout
    h = mx.zeros((1, 1, layout.hidden_size), dtype=layout.hidden_dtype)
    for index, layer_cache in zip(stage.layers, cache, strict=True):
        h = layout.run_layer(index, h, layer_cache)
    mx.eval(h, [c.state for c in cache])
    allocated = [c.keys[0] if isinstance(c.keys, tuple) else c.keys for c in cache]
    return max(1, round(sum(c.nbytes / k.shape[2] for c, k in zip(cache, allocated, strict=True))))


def budget_tokens(kind: str, value: int, reserved_mb: int, per_token: int) -> int:
    """How many tokens of KV fit the budget: a token count, a size, or "auto" (free memory)."""
    if kind == "tokens":
        return value
    if kind == "bytes":
        return value // per_token
    return max(0, available_memory() - reserved_mb * 2**20) // per_token
