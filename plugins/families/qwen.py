"""Qwen: Alibaba's Qwen2, Qwen3, Qwen3-Next and Qwen3.5, dense and mixture-of-experts."""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from mlxserve.plugins.family import ModelFamily
from mlxserve.plugins.gguf_mapping import (
    LAYER_TENSORS,
    MOE_LAYER_TENSORS,
    GGUFModel,
    decoder_config,
    decoder_weights,
    moe_config,
)
from mlxserve.plugins.hookspecs import hookimpl
from mlxserve.plugins.reasoning import ThinkTags
from mlxserve.plugins.tiny_configs import TINY_CONFIGS
from mlxserve.plugins.tool_calls import HermesToolCalls

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_DENSE = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
}
_MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}
_TINY: dict[str, dict[str, Any]] = {
    "qwen2": {"architectures": ["Qwen2ForCausalLM"], **_DENSE},
    "qwen3": {"architectures": ["Qwen3ForCausalLM"], **_DENSE, "head_dim": 64},
    "qwen2_moe": {
        "architectures": ["Qwen2MoeForCausalLM"],
        **_DENSE,
        **_MOE,
        "shared_expert_intermediate_size": 64,
        "decoder_sparse_step": 1,
        "tie_word_embeddings": False,
    },
    "qwen3_moe": {
        "architectures": ["Qwen3MoeForCausalLM"],
        **_DENSE,
        **_MOE,
        "head_dim": 64,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
        "tie_word_embeddings": False,
    },
}


class Qwen(ModelFamily):
    name = "qwen"
    model_types = (
        "qwen3",
        "qwen2",
        "qwen3_moe",
        "qwen2_moe",
        "qwen3_5",
        "qwen3_5_moe",
        "qwen3_next",
    )
    chat_template = CHAT_TEMPLATE
    stop_tokens = ("<|im_end|>", "<|endoftext|>")
    control_tokens = ("<|im_start|>",)
    tool_call_format = HermesToolCalls()
    reasoning_format = ThinkTags()
    # Qwen3's recommendation for thinking (its main generation; greedy makes it repeat itself).
    sampling_defaults = {"temperature": 0.6, "top_p": 0.95, "top_k": 20}
    gguf_architectures = ("qwen2", "qwen3", "qwen3moe")

    def gguf_config(self, gguf: GGUFModel) -> dict[str, Any]:
        if gguf.architecture == "qwen3moe":
            return {"model_type": "qwen3_moe", **decoder_config(gguf), **moe_config(gguf)}
        return super().gguf_config(gguf)

    def gguf_weights(self, gguf: GGUFModel, config: dict[str, Any]) -> dict[str, mx.array]:
        if gguf.architecture == "qwen3moe":
            return decoder_weights(gguf, self.name, {**LAYER_TENSORS, **MOE_LAYER_TENSORS})
        return super().gguf_weights(gguf, config)

    def tiny_config(self, model_type: str) -> dict[str, Any]:
        if model_type in TINY_CONFIGS:
            return TINY_CONFIGS[model_type]
        return {"model_type": model_type, **_TINY[model_type]}


@hookimpl
def mlxserve_families() -> list[ModelFamily]:
    return [Qwen()]
