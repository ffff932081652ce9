"""llama.cpp's GGUF names, as Hugging Face config keys and mlx-lm weight names.

A GGUF file keeps a model's config under ``{architecture}.*`` metadata keys and its tensors
under llama.cpp's names (``blk.0.attn_q.weight``). Families that serve GGUF files map them
with these helpers; the names below are the ones llama.cpp gives every Llama-like decoder.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from mlxserve.core.errors import UnsupportedModelError

GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# A mixture-of-experts layer's router and experts, each expert tensor stacked over the experts
# (experts, out, in), as mlx-lm's SwitchGLU keeps them (Qwen MoE's names).
MOE_LAYER_TENSORS = {
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.switch_mlp.gate_proj",
    "ffn_up_exps": "mlp.switch_mlp.up_proj",
    "ffn_down_exps": "mlp.switch_mlp.down_proj",
}
# llama.cpp architectures mlxserve's own families do not convert, and why (MLX 0.32, mlx-lm
# 0.32); the refusal says so. A plugin family may still claim them.
UNMAPPED_ARCHITECTURES = {
    "gpt-oss": "its experts are MXFP4 tensors, which MLX's GGUF reader skips without a word",
    "llama4": (
        "llama.cpp fixes its no-rope layers, chunked attention and attention temperature in "
        "code, not in the file, and mlx-lm's llama4_text is only the dense variant (Scout and "
        "Maverick are mixtures of experts)"
    ),
    "gemma3": (
        "no built-in family serves gemma3_text, and llama.cpp stores its norms with Gemma's +1 "
        "and fixes its sliding-window pattern and local rope base in code, not in the file"
    ),
}
ROPE_FREQS = "rope_freqs.weight"  # Llama 3's rope scaling, one factor per rotary pair
# A quantized tensor NAME.weight is read as NAME.weight, NAME.scales and NAME.biases.
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias|scales|biases)")
_GLOBAL_NAME = re.compile(r"(\w+)\.(weight|bias|scales|biases)")


@dataclass(frozen=True)
class GGUFModel:
    """A GGUF file read into memory.

    Attributes:
        path: the file.
        architecture: its ``general.architecture``, e.g. ``"llama"`` or ``"qwen3"``.
        metadata: every metadata key, as Python values (numbers, strings, lists).
        tensors: its tensors under llama.cpp's names, as MLX arrays; quantized ones are
            already MLX affine triples (``NAME.weight`` uint32, ``NAME.scales``, ``NAME.biases``),
            or floats (the types with 16-value sub-blocks: Q6_K, Q3_K, Q2_K).
        tensor_types: each tensor's type in the file (e.g. ``{"token_embd.weight": "Q8_0"}``).
        num_parameters: how many numbers the tensors hold.
    """

    path: Path
    architecture: str
    metadata: Mapping[str, Any]
    tensors: Mapping[str, mx.array]
    tensor_types: Mapping[str, str]
    num_parameters: int

    def value(self, key: str, default: Any = None) -> Any:
        """The metadata value ``{architecture}.{key}``, or ``default``."""
        return self.metadata.get(f"{self.architecture}.{key}", default)

    def required(self, key: str) -> Any:
        """The metadata value ``{architecture}.{key}``; an error names it when it is missing."""
        value = self.value(key)
        if value is None:
            raise UnsupportedModelError(
                f"{self.path.name}: its metadata has no {self.architecture}.{key}"
            )
        return value

    def layer_value(self, key: str, default: Any = None) -> Any:
        """A value llama.cpp may write once or once per layer (then all must agree);
        required unless a ``default`` is given."""
        value = self.required(key) if default is None else self.value(key, default)
        if not isinstance(value, list):
            return value
        if len(set(value)) != 1:
            raise UnsupportedModelError(
                f"{self.path.name}: {self.architecture}.{key} differs between layers "
                f"({sorted(set(value))}), which mlxserve cannot convert"
            )
        return value[0]


def decoder_config(gguf: GGUFModel) -> dict[str, Any]:
    """config.json keys (without ``model_type``) of a Llama-like decoder, from llama.cpp's
    metadata keys; the tensors tell the embedding size, tying and biases."""
    heads = gguf.layer_value("attention.head_count")
    hidden = gguf.required("embedding_length")
    tensors = gguf.tensors
    if "token_embd.weight" not in tensors:
        raise UnsupportedModelError(f"{gguf.path.name}: it has no token_embd.weight tensor")
    config: dict[str, Any] = {
        "hidden_size": hidden,
        "intermediate_size": gguf.layer_value("feed_forward_length"),
        "num_hidden_layers": gguf.required("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": gguf.layer_value("attention.head_count_kv", heads),
        "head_dim": gguf.value("attention.key_length", hidden // heads),
        "rms_norm_eps": gguf.required("attention.layer_norm_rms_epsilon"),
        "rope_theta": gguf.value("rope.freq_base", 10000.0),
        "max_position_embeddings": gguf.value("context_length", 4096),
        "vocab_size": tensors["token_embd.weight"].shape[0],
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "mlp_bias": "blk.0.ffn_up.bias" in tensors,
        **_special_token_ids(gguf.metadata),
    }
    if gguf.value("attention.sliding_window"):
        config["sliding_window"] = gguf.value("attention.sliding_window")
    scaling = rope_scaling(gguf)
    if ROPE_FREQS in tensors:
        scaling = llama3_rope_scaling(gguf, config["head_dim"])
    if scaling:
        config["rope_scaling"] = scaling
    return config


def moe_config(gguf: GGUFModel) -> dict[str, Any]:
    """config.json keys of a mixture of experts as mlx-lm's Qwen MoE models read them
    (``num_experts``, ...), from llama.cpp's ``expert_*`` keys; layers without a router
    (``ffn_gate_inp``) are dense. llama.cpp always renormalizes the chosen experts' weights
    (softmax gating), so ``norm_topk_prob`` is true; a file that scales them is refused."""
    layers = gguf.required("block_count")
    dense = [i for i in range(layers) if f"blk.{i}.ffn_gate_inp.weight" not in gguf.tensors]
    if len(dense) == layers:
        raise UnsupportedModelError(
            f"{gguf.path.name}: its metadata says GGUF architecture {gguf.architecture!r}, "
            f"but it has no experts (no ffn_gate_inp tensors)"
        )
    scale = gguf.value("expert_weights_scale")
    if scale not in (None, 0, 1):
        raise UnsupportedModelError(
            f"{gguf.path.name}: {gguf.architecture}.expert_weights_scale is {scale}, "
            f"which mlxserve cannot convert"
        )
    return {
        "num_experts": gguf.required("expert_count"),
        "num_experts_per_tok": gguf.required("expert_used_count"),
        "moe_intermediate_size": gguf.required("expert_feed_forward_length"),
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": dense,
    }


def rope_scaling(gguf: GGUFModel) -> dict[str, Any] | None:
    """config.json's ``rope_scaling`` from ``rope.scaling.*`` (linear and yarn), or None."""
    kind = gguf.value("rope.scaling.type")
    factor = gguf.value("rope.scaling.factor")
    if kind in (None, "none") or not factor:
        return None
    scaling = {"type": kind, "factor": factor}
    original = gguf.value("rope.scaling.original_context_length")
    if original:
        scaling["original_max_position_embeddings"] = original
    return scaling


def llama3_rope_scaling(gguf: GGUFModel, head_dim: int) -> dict[str, Any]:
    """config.json's ``llama3`` rope_scaling that gives the file's ``rope_freqs`` factors.

    llama.cpp stores the factors, not the settings they come from: factor (the largest), and
    a line through the "smooth" ones that fixes where the low and high frequencies end.
    """
    factors = np.array(gguf.tensors[ROPE_FREQS].astype(mx.float32), dtype=np.float64)
    base = gguf.value("rope.freq_base", 10000.0)
    dims = gguf.value("rope.dimension_count", head_dim)
    wavelengths = 2 * math.pi * base ** (np.arange(0, dims, 2) / dims)
    factor = float(factors.max())
    smooth = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    scaling = None
    if smooth.sum() >= 2:
        shares = (1 / factors[smooth] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(1 / wavelengths[smooth], shares, 1)
        if intercept < 0:  # shares = (context / wavelength - low) / (high - low), with low = 1
            high = 1 - 1 / intercept
            scaling = {
                "type": "llama3",
                "factor": factor,
                "low_freq_factor": 1.0,
                "high_freq_factor": round(float(high), 4),
                "original_max_position_embeddings": round(float(slope * (high - 1)), 2),
            }
    if scaling is None or not np.allclose(_llama3_factors(scaling, wavelengths), factors, 1e-4):
        raise UnsupportedModelError(
            f"{gguf.path.name}: its {ROPE_FREQS} are not a Llama 3 rope scaling mlxserve "
            f"can recover"
        )
    return scaling


def _llama3_factors(scaling: dict[str, Any], wavelengths: np.ndarray) -> np.ndarray:
    factor, low, high = (scaling[k] for k in ("factor", "low_freq_factor", "high_freq_factor"))
    context = scaling["original_max_position_embeddings"]
    shares = (context / wavelengths - low) / (high - low)
    smooth = 1 / ((1 - shares) / factor + shares)
    return np.where(
        wavelengths < context / high, 1.0, np.where(wavelengths > context / low, factor, smooth)
    )


def _special_token_ids(metadata: Mapping[str, Any]) -> dict[str, Any]:
    ids: dict[str, Any] = {}
    if metadata.get("tokenizer.ggml.bos_token_id") is not None:
        ids["bos_token_id"] = metadata["tokenizer.ggml.bos_token_id"]
    ends = [
        metadata[f"tokenizer.ggml.{kind}_token_id"]
        for kind in ("eos", "eot", "eom")
        if metadata.get(f"tokenizer.ggml.{kind}_token_id") is not None
    ]
    if ends:
        ids["eos_token_id"] = list(dict.fromkeys(ends))
    return ids


def decoder_weight_name(name: str, layer_tensors: Mapping[str, str] = LAYER_TENSORS) -> str | None:
    """The mlx-lm name of a llama.cpp tensor name, or None if it is not a decoder's."""
    if match := _LAYER_NAME.fullmatch(name):
        index, part, suffix = match.groups()
        if part in layer_tensors:
            return f"model.layers.{index}.{layer_tensors[part]}.{suffix}"
        return None
    if match := _GLOBAL_NAME.fullmatch(name):
        part, suffix = match.groups()
        if part in GLOBAL_TENSORS:
            return f"{GLOBAL_TENSORS[part]}.{suffix}"
    return None


def decoder_weights(
    gguf: GGUFModel, family: str, layer_tensors: Mapping[str, str] = LAYER_TENSORS
) -> dict[str, mx.array]:
    """Every tensor under its mlx-lm name (a layer's by ``layer_tensors``, e.g. with
    ``MOE_LAYER_TENSORS`` added); tensors a decoder has no place for are an error."""
    weights, strays = {}, []
    for name, tensor in gguf.tensors.items():
        if name == ROPE_FREQS:  # in config.json's rope_scaling
            continue
        renamed = decoder_weight_name(name, layer_tensors)
        if renamed is None:
            strays.append(name)
        else:
            weights[renamed] = tensor
    if strays:
        raise UnsupportedModelError(
            f"{gguf.path.name}: the {family} family has no place for the tensors {listed(strays)} "
            f"(GGUF architecture {gguf.architecture!r})"
        )
    return weights


def unpermute_rows(weight: mx.array, heads: int) -> mx.array:
    """A q or k projection's rows from llama.cpp's rotary order back to Hugging Face's.

    llama.cpp interleaves each head's two rotary halves (it rotates adjacent pairs); this
    undoes it, row by row, so it works on quantized weights, scales, biases and bias alike.
    """
    rows = weight.shape[0]
    grouped = weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:])
    return grouped.swapaxes(1, 2).reshape(weight.shape)


def listed(names: list[str], shown: int = 5) -> str:
    """``a, b, c and 4 more``: the first few of ``names``, sorted."""
    names = sorted(names)
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
