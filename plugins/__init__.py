"""The plugin contract: hook markers, the ModelFamily base class, and the built-in families."""

import mlxserve.core  # noqa: F401  (first: it puts a fast BLAS under MLX before MLX loads)

from .family import ModelFamily
from .gguf_mapping import GGUFModel
from .hookspecs import hookimpl, hookspec
from .tool_calls import TextPiece, ToolCall, ToolCallFormat, ToolCallParser

__all__ = [
    "GGUFModel",
    "ModelFamily",
    "TextPiece",
    "ToolCall",
    "ToolCallFormat",
    "ToolCallParser",
    "hookimpl",
    "hookspec",
]
