"""mlxserve's own answers to the override hooks: ``trylast``, so any plugin comes first."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.nn as nn

from mlxserve.core.kv.caches import KVCacheOptions
from mlxserve.core.model.layout import DecoderLayout
from mlxserve.plugins.family import ModelFamily
from mlxserve.plugins.hookspecs import hookimpl
from mlxserve.plugins.reasoning import ReasoningFormat
from mlxserve.plugins.tool_calls import ToolCallFormat


@hookimpl(trylast=True)
def mlxserve_sharding_rule(family: ModelFamily, model: nn.Module) -> DecoderLayout:
    return family.layout(model)


@hookimpl(trylast=True)
def mlxserve_kv_cache_factory(
    family: ModelFamily, model: nn.Module, options: KVCacheOptions, layers: Sequence[int]
) -> list[Any]:
    return family.make_cache(model, options, layers)


@hookimpl(trylast=True)
def mlxserve_chat_template(family: ModelFamily, tokenizer: Any) -> str:
    return getattr(tokenizer, "chat_template", None) or family.chat_template


@hookimpl(trylast=True)
def mlxserve_tool_call_format(family: ModelFamily) -> ToolCallFormat | None:
    return family.tool_call_format


@hookimpl(trylast=True)
def mlxserve_reasoning_format(family: ModelFamily) -> ReasoningFormat | None:
    return family.reasoning_format
