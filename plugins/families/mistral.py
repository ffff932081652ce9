"""Mistral: Mistral 7B and its kin (sliding-window attention), Ministral 3, Mistral 3 and 4."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

import mlx.nn as nn
from mlx_lm.models import llama

from mlxserve.core.kv.caches import CacheKind
from mlxserve.plugins.families.llama import Llama
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
    call_from_object,
    calls_grammar,
    dumps,
    lark_json_call,
    lark_marker,
)

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}"
    "{% else %}[INST] {{ message['content'] }} [/INST]{% endif %}{% endfor %}"
)


TOOL_CALLS, ARGS, CALL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"
NAMED_CALL = re.compile(rf"([\w.\-]+)(?:{re.escape(CALL_ID)}\w+)?{re.escape(ARGS)}\s*")
NAME_CHARS = re.compile(r"[\w.\-]*")


def could_become_named_call(text: str) -> bool:
    """Whether more text could still make ``text`` a ``name[CALL_ID]id[ARGS]`` head."""
    head = NAME_CHARS.match(text)  # matches the empty string too: never None
    name = head.group() if head else ""
    rest = text[len(name) :]
    if not rest or not name:
        return not rest
    if ARGS.startswith(rest) or CALL_ID.startswith(rest):
        return True
    if not rest.startswith(CALL_ID):
        return False
    after = rest[len(CALL_ID) :]
    id_match = re.match(r"\w*", after)  # never None, as above
    call_id = id_match.group() if id_match else ""
    return ARGS.startswith(after[len(call_id) :])


class MistralParser(MarkerParser):
    """``[TOOL_CALLS][{...}, ...]`` and the newer ``[TOOL_CALLS]name[ARGS]{...}``."""

    openers = (TOOL_CALLS,)

    def take(self, region: str, final: bool) -> Region | None:
        start = len(region) - len(region[len(TOOL_CALLS) :].lstrip())
        if start == len(region):
            return None
        if region[start] == "[":
            return self._json_value(region, start, list)
        head = NAMED_CALL.match(region, start)
        if head is not None:
            return self._json_value(region, head.end(), dict, head.group(1))
        if could_become_named_call(region[start:]):
            return None
        return [TextPiece(TOOL_CALLS)], len(TOOL_CALLS)

    def _json_value(self, region: str, at: int, kind: type, name: str = "") -> Region | None:
        try:
            value, end = json.JSONDecoder().raw_decode(region, at)
        except ValueError:
            return None
        if not isinstance(value, kind) or not value and kind is list:
            return [TextPiece(region[:end])], end
        objects = value if isinstance(value, list) else [{"name": name, "arguments": value}]
        calls = [call for call in map(call_from_object, objects) if call is not None]
        if len(calls) < len(objects):
            return [TextPiece(region[:end])], end
        return calls, end


class MistralToolCalls(ToolCallFormat):
    """Mistral's ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``."""

    name = "mistral"
    markers = (TOOL_CALLS, ARGS, CALL_ID)

    def parser(self) -> ToolCallParser:
        return MistralParser()

    def grammar(
        self, tools: list[dict[str, Any]], *, parallel: bool, special: Mapping[str, int] = {}
    ) -> str:
        def one_call(name: str, parameters: Mapping[str, Any] | None) -> str:
            return lark_json_call(name, parameters, "arguments")

        before = f'{lark_marker(TOOL_CALLS, special)} "["'
        return calls_grammar(
            tools, one_call, parallel=parallel, separator='", "', before=before, after='"]"'
        )

    def render_calls(self, calls: list[ToolCall]) -> str:
        objects = [{"name": call.name, "arguments": arguments_value(call)} for call in calls]
        return TOOL_CALLS + dumps(objects)

    def tools_prompt(self, tools: list[dict[str, Any]]) -> str:
        return (
            f"[AVAILABLE_TOOLS]{dumps(tools)}[/AVAILABLE_TOOLS]\n"
            "To call tools, answer with [TOOL_CALLS] followed by a JSON list of "
            '{"name": <function name>, "arguments": <arguments object>} and nothing else.'
        )

    def render_result(self, name: str | None, content: str) -> str:
        return f"[TOOL_RESULTS]{dumps({'content': content})}[/TOOL_RESULTS]"

    def prompt_call_id(self, call_id: str) -> str:
        if len(call_id) == 9 and call_id.isalnum():
            return call_id
        return hashlib.sha256(call_id.encode()).hexdigest()[:9]


# Model types mlx-lm has a module of; the others (mistral, and "llama" from a GGUF file) are
# Llama's architecture.
MLX_LM_MODULES = ("mistral3", "ministral3", "mistral4")


class SlidingWindowModel(llama.Model):
    """Llama's model with every layer windowed, as config.json's ``sliding_window`` asks.

    mlx-lm's llama file ignores ``sliding_window`` unless ``layer_types`` says which
    layers slide; Mistral's configs mean all of them.
    """

    def __init__(self, args: llama.ModelArgs) -> None:
        super().__init__(args)
        args.layer_types = ["sliding_attention"] * args.num_hidden_layers
        self.model.layer_types = args.layer_types
        for layer in self.model.layers:
            layer.use_sliding = True
        self.model.swa_idx = 0


class Mistral(Llama):
    name = "mistral"
    model_types = ("mistral", "mistral3", "ministral3", "mistral4")
    chat_template = CHAT_TEMPLATE
    bos_token = "<s>"
    stop_tokens = ("</s>",)
    control_tokens = ("[INST]", "[/INST]")
    tool_call_format = MistralToolCalls()
    gguf_architectures = ()  # llama.cpp writes Mistral as "llama": the Llama family converts it

    def model_classes(self, config: dict[str, Any]) -> tuple[type[nn.Module], type[Any]]:
        if config["model_type"] in MLX_LM_MODULES:
            return super().model_classes(config)
        windowed = config.get("sliding_window") and not config.get("layer_types")
        return (SlidingWindowModel if windowed else llama.Model), llama.ModelArgs

    def cache_kinds(self, model: nn.Module) -> list[CacheKind]:
        kinds = super().cache_kinds(model)
        if model.args.model_type == "mistral4":  # MLA's latents, which are not quantized
            return ["latent" if kind == "full" else kind for kind in kinds]
        return kinds

    def tiny_config(self, model_type: str) -> dict[str, Any]:
        if model_type != "mistral":
            return TINY_CONFIGS[model_type]
        return {
            **super().tiny_config("llama"),
            "architectures": ["MistralForCausalLM"],
            "model_type": "mistral",
            "sliding_window": 32,
            "head_dim": 64,
        }


@hookimpl
def mlxserve_families() -> list[Mistral]:
    return [Mistral()]
