"""Mistral: Mistral 7B and its kin, including checkpoints with sliding-window attention."""

from __future__ import annotations

from typing import Any

import mlx.nn as nn
from mlx_lm.models import llama

from .hookspecs import hookimpl
from .llama import Llama

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}"
    "{% else %}[INST] {{ message['content'] }} [/INST]{% endif %}{% endfor %}"
)


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
    model_types = ("mistral",)
    chat_template = CHAT_TEMPLATE
    bos_token = "<s>"
    stop_tokens = ("</s>",)
    control_tokens = ("[INST]", "[/INST]")

    def model_classes(self, config: dict[str, Any]) -> tuple[type[nn.Module], type]:
        windowed = config.get("sliding_window") and not config.get("layer_types")
        return (SlidingWindowModel if windowed else llama.Model), llama.ModelArgs

    def tiny_config(self, model_type: str) -> dict[str, Any]:
        return {
            **super().tiny_config(model_type),
            "architectures": ["MistralForCausalLM"],
            "model_type": "mistral",
            "sliding_window": 32,
            "head_dim": 64,
        }


@hookimpl
def mlxserve_families() -> list[Mistral]:
    return [Mistral()]
