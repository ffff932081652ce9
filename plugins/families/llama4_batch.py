"""Llama 4 that batches: chunk masks from the caches, temperature scaling by row.

mlx-lm's Llama 4 builds the chunk mask from the first cache's offset, one for the whole
batch, so rows at different positions would share a wrong mask. With mlxserve's chunked
caches (core/kv/chunked.py) each cache builds its own rows' masks, and the NoPE layers'
temperature scaling (written for one offset) takes each row's; with mlx-lm's own caches the
model runs exactly as mlx-lm wrote it.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.models import llama4
from mlx_lm.models.base import create_attention_mask, scaled_dot_product_attention

from mlxserve.core.kv.chunked import BatchChunkedCache, ChunkedCache

CHUNKED_EVERY = 4  # every fourth layer attends globally (mlx-lm's llama4 hard-codes it too)


class _TextModel(llama4.LlamaModel):
    def __call__(self, inputs: mx.array, cache: Any = None) -> mx.array:
        if cache is None or not isinstance(cache[0], (ChunkedCache, BatchChunkedCache)):
            return super().__call__(inputs, cache)
        h = self.embed_tokens(inputs)
        chunked = create_attention_mask(h, cache[0])
        full = create_attention_mask(h, cache[CHUNKED_EVERY - 1])
        for index, (layer, layer_cache) in enumerate(zip(self.layers, cache, strict=True)):
            mask = full if (index + 1) % CHUNKED_EVERY == 0 else chunked
            h = layer(h, mask, cache=layer_cache)
        return self.norm(h)


class _Attention(llama4.Attention):
    """Attention whose NoPE temperature scaling takes each row's own position."""

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        offset = getattr(cache, "offset", 0)
        if not isinstance(offset, mx.array) or self.use_rope or not self.attn_temperature_tuning:
            return super().__call__(x, mask, cache)
        batch, length, _ = x.shape
        queries, keys, values = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        queries = queries.reshape(batch, length, self.n_heads, -1).transpose(0, 2, 1, 3)
        keys = keys.reshape(batch, length, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        values = values.reshape(batch, length, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        if self.use_qk_norm:
            queries = mx.fast.rms_norm(queries, weight=None, eps=1e-6)
            keys = mx.fast.rms_norm(keys, weight=None, eps=1e-6)
        # Padding sits at negative positions: clamped, so that it stays finite.
        positions = mx.maximum(offset[:, None] + mx.arange(1, length + 1)[None], 0)
        scales = mx.log(mx.floor(positions / self.floor_scale) + 1.0) * self.attn_scale + 1.0
        queries = (queries * scales[:, None, :, None]).astype(queries.dtype)
        keys, values = cache.update_and_fetch(keys, values)
        output = scaled_dot_product_attention(
            queries, keys, values, cache=cache, scale=self.scale, mask=mask
        )
        return self.o_proj(output.transpose(0, 2, 1, 3).reshape(batch, length, -1))


class Model(llama4.Model):
    def __init__(self, args: llama4.ModelArgs) -> None:
        super().__init__(args)
        text = self.language_model.model
        text.__class__ = _TextModel
        for layer in text.layers:
            layer.self_attn.__class__ = _Attention
