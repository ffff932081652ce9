"""The plugin author kit, run over every built-in family and the example plugin."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import RotatingKVCache

from mlxserve.core.kv.caches import KVCacheOptions
from mlxserve.core.model.exactness import ExactnessError
from mlxserve.core.model.layout import DecoderLayout
from mlxserve.plugins.family import ModelFamily
from mlxserve.plugins.testing import (
    check_exactness,
    check_family,
    check_kv_cache,
    check_pipeline_split,
)
from mlxserve.plugins.tiny import write_tiny_checkpoint
from mlxserve.registry.plugins import Plugins

from ..support import BUILTIN_FAMILIES


@pytest.mark.parametrize("name", BUILTIN_FAMILIES)
def test_builtin_family_passes_the_author_kit(
    name: str, builtin_families: dict[str, ModelFamily], tmp_path: Path
) -> None:
    check_family(builtin_families[name], tmp_path)


def test_example_plugin_family_passes_the_author_kit(plugins: Plugins, tmp_path: Path) -> None:
    check_family(plugins.family("gemma"), tmp_path)


class UnscaledLayout(DecoderLayout):
    """Gemma's forward pass written out by hand, without its embedding scale."""

    def run(self, tokens: mx.array, cache: Sequence[Any]) -> mx.array:
        inner = self.model.model
        h = inner.embed_tokens(tokens)
        mask = create_attention_mask(h, cache[0])
        for layer, layer_cache in zip(inner.layers, cache, strict=True):
            h = layer(h, mask, layer_cache)
        return inner.embed_tokens.as_linear(inner.norm(h))


def test_the_exactness_check_refuses_a_layout_that_drops_the_embedding_scale(
    plugins: Plugins, tmp_path: Path
) -> None:
    gemma = plugins.family("gemma")

    class Unscaled(type(gemma)):  # type: ignore[misc]
        def layout(self, model):  # noqa: ANN001, ANN202
            return UnscaledLayout(model)

    path = write_tiny_checkpoint(gemma, tmp_path / "gemma")
    with pytest.raises(
        ExactnessError,
        match=r"gemma: layers 0-3 differ .* at the prefill in two chunks: .*"
        r"layer 0 is the first whose output differs",
    ):
        check_exactness(Unscaled(), path)


def test_the_exactness_check_refuses_caches_that_forget_too_soon(
    builtin_families: dict[str, ModelFamily], tmp_path: Path
) -> None:
    """Mistral's 32-token windows kept in 8-token caches: refused, not served. (Full caches
    would be exact: the model's own mask keeps its windows.)"""
    mistral = builtin_families["mistral"]

    class Forgetful(type(mistral)):  # type: ignore[misc]
        def cache_templates(self, model):  # noqa: ANN001, ANN202
            return [RotatingKVCache(max_size=8) for _ in model.layers]

    path = write_tiny_checkpoint(mistral, tmp_path / "mistral")
    with pytest.raises(ExactnessError, match="mistral: layers 0-3 differ"):
        check_exactness(Forgetful(), path, num_stages=1)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_kv_cache_stays_close(
    bits: int, builtin_families: dict[str, ModelFamily], tiny_checkpoints: dict[str, Path]
) -> None:
    check_kv_cache(builtin_families["llama"], tiny_checkpoints["llama"], bits=bits)


def test_three_stage_split(builtin_families: dict[str, ModelFamily], tiny_checkpoints) -> None:
    check_pipeline_split(builtin_families["qwen"], tiny_checkpoints["qwen"], num_stages=3)
    check_exactness(builtin_families["qwen"], tiny_checkpoints["qwen"], num_stages=3)


def test_cache_kinds(builtin_families: dict[str, ModelFamily], tiny_checkpoints) -> None:
    from mlx_lm.models.cache import KVCache, QuantizedKVCache, RotatingKVCache
    from mlx_lm.utils import load_model

    def caches(name: str, bits: int | None = None) -> list:
        family = builtin_families[name]
        model, _ = load_model(tiny_checkpoints[name], get_model_classes=family.model_classes)
        return family.make_cache(model, KVCacheOptions(bits=bits), range(4))

    assert all(type(c) is KVCache for c in caches("llama"))
    assert all(isinstance(c, QuantizedKVCache) and c.bits == 8 for c in caches("llama", 8))
    windowed = caches("mistral")
    assert all(type(c) is RotatingKVCache and c.max_size == 32 for c in windowed)
    assert (
        builtin_families["deepseek"].cache_kinds(
            load_model(
                tiny_checkpoints["deepseek"],
                get_model_classes=builtin_families["deepseek"].model_classes,
            )[0]
        )
        == ["latent"] * 4
    )
    latent = caches("deepseek", 8)  # the latent cache cannot be quantized: full precision
    assert all(type(c) is KVCache for c in latent)


def test_mistral_window_really_limits_attention(
    builtin_families: dict[str, ModelFamily], tmp_path: Path
) -> None:
    """A token out of reach (window x layers back) must not change the last logits; near must."""
    from mlx_lm.utils import load_model

    family = builtin_families["mistral"]
    path = write_tiny_checkpoint(family, tmp_path / "m")
    model, _ = load_model(path, get_model_classes=family.model_classes)
    window = family.sliding_window(model)
    reach = window * len(model.layers)
    tokens = mx.array([[(7 * i) % 300 + 3 for i in range(reach + 8)]])
    base = model(tokens)[0, -1]
    far = tokens.tolist()
    far[0][0] = 5
    near = tokens.tolist()
    near[0][-3] = 5
    assert mx.abs(model(mx.array(far))[0, -1] - base).max().item() < 1e-5
    assert mx.abs(model(mx.array(near))[0, -1] - base).max().item() > 1e-3
