"""gpt-oss: OpenAI's open-weight models, which think in harmony's analysis channel."""

from __future__ import annotations

from typing import Any

from mlxserve.plugins.family import ModelFamily
from mlxserve.plugins.hookspecs import hookimpl
from mlxserve.plugins.reasoning import HarmonyChannels
from mlxserve.plugins.tiny_configs import TINY_CONFIGS

# Harmony, reduced to what a tiny checkpoint needs; a real checkpoint brings its own template.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|start|>{{ message['role'] }}<|message|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant{% endif %}"
)


class GptOss(ModelFamily):
    name = "gpt_oss"
    model_types = ("gpt_oss",)
    chat_template = CHAT_TEMPLATE
    stop_tokens = ("<|return|>", "<|call|>")
    control_tokens = ("<|start|>", "<|channel|>", "<|message|>", "<|end|>")
    reasoning_format = HarmonyChannels()
    tool_call_format = None  # harmony's commentary-channel calls are not parsed yet
    sampling_defaults = {"temperature": 1.0, "top_p": 1.0}  # OpenAI's recommendation

    def tiny_config(self, model_type: str) -> dict[str, Any]:
        return TINY_CONFIGS[model_type]


@hookimpl
def mlxserve_families() -> list[ModelFamily]:
    return [GptOss()]
