"""The plugin contract: hook markers, the ModelFamily base class, and the built-in families."""

from mlxserve.core.kv.caches import CacheKind, KVCacheOptions
from mlxserve.core.model.layout import DecoderLayout
from mlxserve.plugins.family import ModelFamily
from mlxserve.plugins.gguf_mapping import GGUFModel
from mlxserve.plugins.hookspecs import hookimpl, hookspec
from mlxserve.plugins.reasoning import (
    HarmonyChannels,
    ReasoningFormat,
    ReasoningParser,
    ReasoningPiece,
    ThinkTags,
)
from mlxserve.plugins.tool_calls import TextPiece, ToolCall, ToolCallFormat, ToolCallParser

__all__ = [
    "CacheKind",
    "DecoderLayout",
    "GGUFModel",
    "HarmonyChannels",
    "KVCacheOptions",
    "ModelFamily",
    "ReasoningFormat",
    "ReasoningParser",
    "ReasoningPiece",
    "TextPiece",
    "ThinkTags",
    "ToolCall",
    "ToolCallFormat",
    "ToolCallParser",
    "hookimpl",
    "hookspec",
]
