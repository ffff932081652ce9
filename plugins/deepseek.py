"""DeepSeek: V2 and V3 (mixture of experts; V3 caches a compressed latent per token)."""

from __future__ import annotations

from typing import Any

import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask

from mlxserve.core.kv_cache import CacheKind
from mlxserve.core.layout import DecoderLayout

from .family import ModelFamily
from .hookspecs import hookimpl

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}<｜User｜>{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<｜Assistant｜>{{ message['content'] }}"
    "{{ eos_token }}{% else %}{{ message['content'] }}\n\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<｜Assistant｜>{% endif %}"
)

LATENT_TYPES = ("deepseek_v3", "kimi_k2")


def array_mask(h: Any, cache: Any, layer: nn.Module) -> Any:
    """MLA attention adds the mask to its scores, so it needs a real array, not "causal"."""
    return create_attention_mask(h, cache, return_array=True)


class DeepSeek(ModelFamily):
    name = "deepseek"
    model_types = ("deepseek_v3", "deepseek_v2")
    chat_template = CHAT_TEMPLATE
    bos_token = "<｜begin▁of▁sentence｜>"
    stop_tokens = ("<｜end▁of▁sentence｜>",)
    control_tokens = ("<｜User｜>", "<｜Assistant｜>")

    def layout(self, model: nn.Module) -> DecoderLayout:
        if model.args.model_type in LATENT_TYPES:
            return DecoderLayout(model, mask=array_mask)
        return DecoderLayout(model)

    def cache_kinds(self, model: nn.Module) -> list[CacheKind]:
        kind: CacheKind = "latent" if model.args.model_type in LATENT_TYPES else "full"
        return [kind] * len(model.model.layers)

    def tiny_config(self, model_type: str) -> dict[str, Any]:
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
