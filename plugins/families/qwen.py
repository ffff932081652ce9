"""Qwen: Alibaba's Qwen2 and Qwen3, dense and mixture-of-experts."""

from __future__ import annotations

from typing import Any

from mlxserve.plugins.family import ModelFamily
from mlxserve.plugins.hookspecs import hookimpl
from mlxserve.plugins.reasoning import ThinkTags
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
    model_types = ("qwen3", "qwen2", "qwen3_moe", "qwen2_moe")
    chat_template = CHAT_TEMPLATE
    stop_tokens = ("<|im_end|>", "<|endoftext|>")
    control_tokens = ("<|im_start|>",)
    tool_call_format = HermesToolCalls()
    reasoning_format = ThinkTags()
    gguf_architectures = ("qwen2", "qwen3")

    def tiny_config(self, model_type: str) -> dict[str, Any]:
        return {"model_type": model_type, **_TINY[model_type]}


@hookimpl
def mlxserve_families() -> list[ModelFamily]:
    return [Qwen()]
