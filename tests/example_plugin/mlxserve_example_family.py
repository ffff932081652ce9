"""An example third-party family plugin: Google's Gemma (first generation).

It names the model type, its chat template and its special tokens; everything else is
mlxserve's default, derived from mlx-lm's model (which scales Gemma's embeddings itself).
"""

from __future__ import annotations

from typing import Any

from mlxserve.plugins import ModelFamily, hookimpl

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{{ message['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


class Gemma(ModelFamily):
    name = "gemma"
    model_types = ("gemma",)
    chat_template = CHAT_TEMPLATE
    bos_token = "<bos>"
    stop_tokens = ("<end_of_turn>", "<eos>")
    control_tokens = ("<start_of_turn>",)

    def tiny_config(self, model_type: str) -> dict[str, Any]:
        return {
            "architectures": ["GemmaForCausalLM"],
            "model_type": "gemma",
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 4,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "head_dim": 64,
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": 4096,
        }


@hookimpl
def mlxserve_families() -> list[ModelFamily]:
    return [Gemma()]
