"""Llama: Meta's Llama 2/3 and the many checkpoints that share its architecture."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import llama4

from mlxserve.plugins.families import llama4_batch
from mlxserve.plugins.family import ModelFamily
from mlxserve.plugins.gguf_mapping import GGUFModel, unpermute_rows
from mlxserve.plugins.hookspecs import hookimpl
from mlxserve.plugins.tiny_configs import TINY_CONFIGS
from mlxserve.plugins.tool_calls import (
    MarkerParser,
    Region,
    TextPiece,
    ToolCall,
    ToolCallFormat,
    ToolCallParser,
    arguments_value,
    calls_grammar,
    dumps,
    json_calls,
    lark_json_call,
    tool_lines,
)

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


PYTHON_TAG = "<|python_tag|>"


class LlamaParser(MarkerParser):
    """A reply that starts with ``{`` (or has ``<|python_tag|>``) is judged at its end."""

    openers = (PYTHON_TAG,)
    openers_at_start = ("{",)

    def take(self, region: str, final: bool) -> Region | None:
        if not final:
            return None
        calls = json_calls(region.removeprefix(PYTHON_TAG))
        return (calls or [TextPiece(region)]), len(region)


class LlamaToolCalls(ToolCallFormat):
    """Llama 3.x JSON calls: ``{"name": ..., "parameters": {...}}``, several apart by ``;``."""

    name = "llama"
    markers = (PYTHON_TAG,)

    def parser(self) -> ToolCallParser:
        return LlamaParser()

    def grammar(
        self, tools: list[dict[str, Any]], *, parallel: bool, special: Mapping[str, int] = {}
    ) -> str:
        def one_call(name: str, parameters: Mapping[str, Any] | None) -> str:
            return lark_json_call(name, parameters, "parameters")

        return calls_grammar(tools, one_call, parallel=parallel, separator='"; "')

    def render_calls(self, calls: list[ToolCall]) -> str:
        return "; ".join(
            dumps({"name": call.name, "parameters": arguments_value(call)}) for call in calls
        )

    def tools_prompt(self, tools: list[dict[str, Any]]) -> str:
        return (
            "Given the following functions, please respond with a JSON for a function call "
            "with its proper arguments that best answers the given prompt.\n\n"
            'Respond in the format {"name": function name, "parameters": dictionary of '
            "argument name and its value}. Do not use variables.\n\n"
            f"{tool_lines(tools)}"
        )


class Llama(ModelFamily):
    name = "llama"
    model_types: ClassVar[tuple[str, ...]] = ("llama", "llama4", "llama4_text")
    chat_template = CHAT_TEMPLATE
    bos_token = "<|begin_of_text|>"
    # Declared as wide as ModelFamily's, so that families built on Llama's may differ.
    stop_tokens: ClassVar[tuple[str, ...]] = ("<|eot_id|>", "<|end_of_text|>")
    control_tokens: ClassVar[tuple[str, ...]] = ("<|start_header_id|>", "<|end_header_id|>")
    tool_call_format: ClassVar[ToolCallFormat | None] = LlamaToolCalls()
    gguf_architectures: ClassVar[tuple[str, ...]] = ("llama",)

    def model_classes(self, config: dict[str, Any]) -> tuple[type[nn.Module], type[Any]]:
        if config["model_type"] == "llama4":
            return llama4_batch.Model, llama4.ModelArgs
        return super().model_classes(config)

    def gguf_weights(self, gguf: GGUFModel, config: dict[str, Any]) -> dict[str, mx.array]:
        heads = {
            "q_proj": config["num_attention_heads"],
            "k_proj": config["num_key_value_heads"],
        }
        weights = super().gguf_weights(gguf, config)
        for name, weight in weights.items():
            projection = name.split(".")[-2]
            if projection in heads:
                weights[name] = unpermute_rows(weight, heads[projection])
        return weights

    def tiny_config(self, model_type: str) -> dict[str, Any]:
        if model_type != "llama":
            return TINY_CONFIGS[model_type]
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 4,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "max_position_embeddings": 4096,
            "tie_word_embeddings": False,
        }


@hookimpl
def mlxserve_families() -> list[ModelFamily]:
    return [Llama()]
