"""DeepSeek: V2, V3, V3.2 and V4.1 (mixture of experts; V3 caches a compressed latent per
token, V3.2 adds an indexer's keys beside it, V4.1 compresses its own per-layer caches)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import mlx.nn as nn

from mlxserve.core.kv.caches import CacheKind
from mlxserve.plugins.family import ModelFamily
from mlxserve.plugins.hookspecs import hookimpl
from mlxserve.plugins.reasoning import ThinkTags
from mlxserve.plugins.tiny_configs import TINY_CONFIGS
from mlxserve.plugins.tool_calls import (
    MarkerParser,
    Region,
    TextPiece,
    ToolCall,
    ToolCallFormat,
    ToolCallParser,
    calls_grammar,
    dumps,
    lark_json,
    lark_literal,
    lark_marker,
    tool_lines,
)

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}<｜User｜>{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<｜Assistant｜>{{ message['content'] }}"
    "{{ eos_token }}{% else %}{{ message['content'] }}\n\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<｜Assistant｜>{% endif %}"
)

LATENT_TYPES = ("deepseek_v3", "kimi_k2")

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
OUTPUTS_BEGIN, OUTPUTS_END = "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>"
OUTPUT_BEGIN, OUTPUT_END = "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"
_BEGIN, _END, _SEP = (re.escape(m) for m in (CALL_BEGIN, CALL_END, SEP))
V3_CALL = re.compile(rf"\s*{_BEGIN}\w+{_SEP}([^\n]+)\n```(?:json)?\n(.*?)\n```\s*{_END}", re.S)
V31_CALL = re.compile(rf"\s*{_BEGIN}([^\n]+?){_SEP}(.*?){_END}", re.S)


def deepseek_calls(body: str) -> list[ToolCall] | None:
    """The calls of a ``<｜tool▁calls▁begin｜>`` block (V3 and V3.1 forms), or None."""
    calls, at = [], 0
    while match := V3_CALL.match(body, at) or V31_CALL.match(body, at):
        try:
            arguments = json.loads(match.group(2))
        except ValueError:
            return None
        if not isinstance(arguments, dict):
            return None
        calls.append(ToolCall(match.group(1).strip(), dumps(arguments)))
        at = match.end()
    return calls if calls and not body[at:].strip() else None


class DeepSeekParser(MarkerParser):
    openers = (CALLS_BEGIN,)

    def take(self, region: str, final: bool) -> Region | None:
        end = region.find(CALLS_END)
        if end < 0 and not final:
            return None
        used = end + len(CALLS_END) if end >= 0 else len(region)
        calls = deepseek_calls(region[len(CALLS_BEGIN) : end if end >= 0 else len(region)])
        return (calls or [TextPiece(region[:used])]), used


class DeepSeekToolCalls(ToolCallFormat):
    """DeepSeek V3's ``<｜tool▁calls▁begin｜>`` blocks, arguments in a json code fence."""

    name = "deepseek"
    markers = (CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP)

    def parser(self) -> ToolCallParser:
        return DeepSeekParser()

    def grammar(
        self, tools: list[dict[str, Any]], *, parallel: bool, special: Mapping[str, int] = {}
    ) -> str:
        def one_call(name: str, parameters: Mapping[str, Any] | None) -> str:
            head = lark_literal(name + "\n```json\n")
            return (
                f'{lark_marker(CALL_BEGIN, special)} "function" {lark_marker(SEP, special)} '
                f"{head} {lark_json(parameters)} "
                f'"\\n```" {lark_marker(CALL_END, special)}'
            )

        return calls_grammar(
            tools,
            one_call,
            parallel=parallel,
            separator='"\\n"',
            before=lark_marker(CALLS_BEGIN, special),
            after=lark_marker(CALLS_END, special),
        )

    def render_calls(self, calls: list[ToolCall]) -> str:
        blocks = "\n".join(
            f"{CALL_BEGIN}function{SEP}{call.name}\n```json\n{call.arguments}\n```{CALL_END}"
            for call in calls
        )
        return f"{CALLS_BEGIN}{blocks}{CALLS_END}"

    def tools_prompt(self, tools: list[dict[str, Any]]) -> str:
        return (
            "## Tools\n\nYou have access to the following functions:\n"
            f"{tool_lines(tools)}\n\n"
            "To call functions, answer with:\n"
            f"{CALLS_BEGIN}{CALL_BEGIN}function{SEP}<function name>\n```json\n"
            f"<arguments object>\n```{CALL_END}{CALLS_END}\n"
            f"with one {CALL_BEGIN}...{CALL_END} per call."
        )

    def render_result(self, name: str | None, content: str) -> str:
        return f"{OUTPUTS_BEGIN}{OUTPUT_BEGIN}{content}{OUTPUT_END}{OUTPUTS_END}"


class DeepSeek(ModelFamily):
    name = "deepseek"
    model_types = ("deepseek_v3", "deepseek_v2", "deepseek_v32", "deepseek_v41")
    chat_template = CHAT_TEMPLATE
    bos_token = "<｜begin▁of▁sentence｜>"
    stop_tokens = ("<｜end▁of▁sentence｜>",)
    control_tokens = ("<｜User｜>", "<｜Assistant｜>")
    tool_call_format = DeepSeekToolCalls()
    reasoning_format = ThinkTags()
    # DeepSeek R1's and V3.1's recommendation (greedy decoding makes them repeat themselves).
    sampling_defaults = {"temperature": 0.6, "top_p": 0.95}

    def cache_kinds(self, model: nn.Module) -> list[CacheKind]:
        kinds = super().cache_kinds(model)
        if model.args.model_type in LATENT_TYPES:  # MLA's latents, which are not quantized
            return ["latent" if kind == "full" else kind for kind in kinds]
        return kinds

    def tiny_config(self, model_type: str) -> dict[str, Any]:
        if model_type in TINY_CONFIGS:
            return TINY_CONFIGS[model_type]
        routing = (
            {"topk_method": "noaux_tc", "scoring_func": "sigmoid", "n_group": 1, "topk_group": 1}
            if model_type == "deepseek_v3"
            else {"topk_method": "greedy"}
        )
        return {
            "architectures": [
                "DeepseekV3ForCausalLM" if model_type == "deepseek_v3" else "DeepseekV2ForCausalLM"
            ],
            "model_type": model_type,
            "hidden_size": 64,
            "intermediate_size": 128,
            "moe_intermediate_size": 32,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "n_shared_experts": 1,
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "routed_scaling_factor": 1.0,
            "norm_topk_prob": True,
            "kv_lora_rank": 32,
            "q_lora_rank": 48,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 56,
            "v_head_dim": 64,
            "first_k_dense_replace": 1,
            "moe_layer_freq": 1,
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "rope_scaling": {
                "type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 1024,
                "beta_fast": 32,
                "beta_slow": 1,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
            },
            "max_position_embeddings": 4096,
            "tie_word_embeddings": False,
            **routing,
        }


@hookimpl
def mlxserve_families() -> list[ModelFamily]:
    return [DeepSeek()]
