"""GGUF files written the way llama.cpp's converter writes them, from tiny checkpoints.

Names come from the gguf package's own tensor-name map (not from mlxserve's), and a Llama's
q/k rows are put in llama.cpp's rotary order, so reading them back tests mlxserve's mapping.
``write_tiny_gguf`` writes a one-tensor file of any tensor type, for the error paths;
``random_blocks`` writes tensors of a quantized type's random blocks (random quants and scale
bytes, finite float16 super-scales), for the types the gguf package cannot quantize.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np

ARCHITECTURES = {
    "llama": gguf.MODEL_ARCH.LLAMA,
    "qwen2": gguf.MODEL_ARCH.QWEN2,
    "qwen3": gguf.MODEL_ARCH.QWEN3,
    "qwen3moe": gguf.MODEL_ARCH.QWEN3MOE,
}
CONTROL = 3
NORMAL = 1
Q = gguf.GGMLQuantizationType
# Where each type's float16 scales (d, and dmin or m) sit in its block, and the largest
# |d|-multiple a value reaches (so a value stays near ``amplitude``): llama.cpp's layouts.
SUPER_SCALES: dict[Q, tuple[tuple[int, ...], int]] = {
    Q.Q4_0: ((0,), 8),
    Q.Q4_1: ((0, 2), 15),
    Q.Q5_0: ((0,), 16),
    Q.Q5_1: ((0, 2), 31),
    Q.Q8_0: ((0,), 128),
    Q.Q4_K: ((0, 2), 63 * 15),
    Q.Q5_K: ((0, 2), 63 * 31),
    Q.Q6_K: ((208,), 128 * 32),
    Q.Q3_K: ((108,), 32 * 4),
    Q.Q2_K: ((80, 82), 15 * 3),
}


def llama_cpp_row_order(weight: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's converter does to a Llama's q and k projections."""
    rows = weight.shape[0]
    grouped = weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
    return grouped.swapaxes(1, 2).reshape(weight.shape)


def llama3_rope_factors(config: dict) -> np.ndarray:
    """The ``rope_freqs`` llama.cpp's converter writes for a Llama 3 rope scaling."""
    scaling, dims = config["rope_scaling"], config["hidden_size"] // config["num_attention_heads"]
    factor, low, high = (scaling[k] for k in ("factor", "low_freq_factor", "high_freq_factor"))
    context = scaling["original_max_position_embeddings"]
    factors = []
    for i in range(0, dims, 2):
        wavelength = 2 * math.pi * config["rope_theta"] ** (i / dims)
        if wavelength < context / high:
            factors.append(1.0)
        elif wavelength > context / low:
            factors.append(factor)
        else:
            smooth = (context / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def random_blocks(
    kind: gguf.GGMLQuantizationType,
    shape: tuple[int, ...],
    rng: np.random.Generator,
    amplitude: float = 1.0,
) -> np.ndarray:
    """Raw blocks (uint8, rows of bytes) of a ``kind`` tensor of ``shape`` (row length last):
    random bytes, with finite float16 scales that keep values within about ``amplitude``."""
    block, size = gguf.GGML_QUANT_SIZES[kind]
    *lead, k = shape
    raw = rng.integers(0, 256, (*lead, k // block * size), dtype=np.uint8)
    blocks = raw.reshape(-1, size)
    offsets, reach = SUPER_SCALES[kind]
    for offset in offsets:
        scale = amplitude / reach * rng.uniform(-1, 1, (blocks.shape[0], 1))
        blocks[:, offset : offset + 2] = scale.astype(np.float16).view(np.uint8)
    return raw


def write_gguf(
    checkpoint: Path,
    dest: Path,
    architecture: str,
    tensor_type: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
    *,
    dequantized: bool = False,
    tensor_types: Callable[[str, tuple[int, ...]], gguf.GGMLQuantizationType] | None = None,
) -> Path:
    """A GGUF of a tiny checkpoint; 2-D and 3-D weights (stacked experts) in ``tensor_type``,
    the rest in F32.

    ``dequantized``: the weights quantized to ``tensor_type`` and back, written as F32.
    ``tensor_types``: each weight's type by its GGUF name and shape (e.g. a Q4_K_M-like mix); a
    type the gguf package cannot quantize gets random blocks of the weight's scale (seeded by
    the name), not the checkpoint's values.
    """
    config = json.loads((checkpoint / "config.json").read_text())
    writer = gguf.GGUFWriter(str(dest), architecture)
    writer.add_name(f"tiny {architecture}")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config["rope_theta"])
    if "head_dim" in config:
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    if config.get("sliding_window"):
        writer.add_sliding_window(config["sliding_window"])
    if config.get("num_experts"):  # what llama.cpp's Qwen MoE converter writes
        writer.add_expert_count(config["num_experts"])
        writer.add_expert_used_count(config["num_experts_per_tok"])
        writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
    add_tokenizer(writer, checkpoint)
    if config.get("rope_scaling", {}).get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(config))
    names = gguf.get_tensor_name_map(ARCHITECTURES[architecture], config["num_hidden_layers"])
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    for name, tensor in sorted(mx.load(str(checkpoint / "model.safetensors")).items()):
        name = name.replace(".switch_mlp.", ".experts.")  # the experts, stacked as llama.cpp does
        data = np.array(tensor.astype(mx.float32))
        projection = name.split(".")[-2]
        if architecture == "llama" and projection in heads:
            data = llama_cpp_row_order(data, heads[projection])
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        kind = tensor_type if tensor_types is None else tensor_types(gguf_name, data.shape)
        if dequantized and data.ndim >= 2:
            data = gguf.quants.dequantize(gguf.quants.quantize(data, kind), kind)
            kind = gguf.GGMLQuantizationType.F32
        add_tensor(writer, gguf_name, data, kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest


def add_tensor(
    writer: gguf.GGUFWriter, name: str, data: np.ndarray, kind: gguf.GGMLQuantizationType
) -> None:
    if data.ndim < 2 or kind == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, data.astype(np.float32))
    elif kind == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(name, data.astype(np.float16))
    else:
        try:
            raw = gguf.quants.quantize(data, kind)
        except NotImplementedError:
            rng = np.random.default_rng(list(name.encode()))
            raw = random_blocks(kind, data.shape, rng, 4 * float(np.abs(data).mean()))
        writer.add_tensor(name, raw, raw_dtype=kind)


def add_tokenizer(writer: gguf.GGUFWriter, checkpoint: Path) -> None:
    """The tiny checkpoint's byte-level BPE tokenizer as llama.cpp's ``gpt2`` tokenizer."""
    spec = json.loads((checkpoint / "tokenizer.json").read_text())
    settings = json.loads((checkpoint / "tokenizer_config.json").read_text())
    vocab = spec["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    special = {t["content"] for t in spec["added_tokens"] if t["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([CONTROL if t in special else NORMAL for t in tokens])
    writer.add_token_merges(merges)
    writer.add_eos_token_id(vocab[settings["eos_token"]])
    if settings.get("bos_token"):
        writer.add_bos_token_id(vocab[settings["bos_token"]])
    writer.add_add_bos_token(False)
    writer.add_chat_template(settings["chat_template"])


def write_tiny_gguf(
    dest: Path,
    architecture: str = "llama",
    kind: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
) -> Path:
    """A GGUF with metadata and one 32x256 tensor of ``kind`` (random bytes if need be)."""
    writer = gguf.GGUFWriter(str(dest), architecture)
    writer.add_block_count(1)
    data = np.random.default_rng(0).standard_normal((32, 256)).astype(np.float32)
    try:
        writer.add_tensor("token_embd.weight", gguf.quants.quantize(data, kind), raw_dtype=kind)
    except NotImplementedError:
        block, size = gguf.GGML_QUANT_SIZES[kind]
        raw = np.random.default_rng(0).integers(0, 60, (32, 256 // block * size), np.uint8)
        writer.add_tensor("token_embd.weight", raw, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest
