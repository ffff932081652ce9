"""GGUF's quantized types read exactly: random blocks of every type read back by mlxserve give
bit for bit the gguf package's float32 decode; MLX's bit packing; a Q4_K_M-like mix of types
in one tiny Llama gives mlx-lm's greedy tokens of the gguf package's decode of the same file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.utils import load_model

from mlxserve.core.errors import UnsupportedModelError
from mlxserve.plugins.family import ModelFamily
from mlxserve.plugins.tiny import write_tiny_checkpoint
from mlxserve.registry.gguf_checkpoint import read_gguf
from mlxserve.registry.gguf_quants import TYPES, Quantized, decode, pack
from mlxserve.registry.plugins import Plugins

from ..support.engine import greedy
from ..support.gguf_files import ARCHITECTURES, random_blocks, write_gguf
from .test_gguf import registry

Q = gguf.GGMLQuantizationType
KINDS = [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q3_K, Q.Q2_K]
BITS = {Q.Q4_0: 4, Q.Q4_1: 4, Q.Q8_0: 8, Q.Q5_0: 5, Q.Q5_1: 5, Q.Q4_K: 4, Q.Q5_K: 5}
PROMPT = [5, 9, 77, 120, 33, 8, 250, 19, 42, 7, 99, 3]


def write_tensors(dest: Path, tensors: dict[str, tuple[Q, np.ndarray]]) -> Path:
    writer = gguf.GGUFWriter(str(dest), "llama")
    writer.add_block_count(1)
    for name, (kind, raw) in tensors.items():
        writer.add_tensor(name, raw, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest


def values(tensors: dict[str, mx.array], name: str, bits: int | None) -> np.ndarray:
    """A tensor's values as mlxserve keeps them: mx.dequantize of a quantized one."""
    if bits is None:
        assert f"{name.removesuffix('.weight')}.scales" not in tensors
        return np.array(tensors[name].astype(mx.float32))
    module = name.removesuffix(".weight")
    scales, biases = (tensors[f"{module}.{p}"] for p in ("scales", "biases"))
    assert scales.dtype == biases.dtype and scales.dtype in (mx.float16, mx.float32)
    dequantized = mx.dequantize(
        tensors[name],
        scales.astype(mx.float32),
        biases.astype(mx.float32),
        group_size=32,
        bits=bits,
        dtype=mx.float32,
    )
    return np.array(dequantized)


@pytest.mark.parametrize("kind", KINDS, ids=lambda kind: kind.name)
def test_random_blocks_are_read_exactly(kind: Q, tmp_path: Path) -> None:
    rng = np.random.default_rng(int(kind))
    shapes = {"a.weight": (3, 256), "b.weight": (5, 1024), "c.weight": (2, 4, 512)}
    raws = {name: random_blocks(kind, shape, rng) for name, shape in shapes.items()}
    raws["d.bias"] = random_blocks(kind, (1, 256), rng)[0]  # no quantized module takes it
    model = read_gguf(write_tensors(tmp_path / "t.gguf", {n: (kind, r) for n, r in raws.items()}))
    for name, raw in raws.items():
        expected = gguf.quants.dequantize(raw, kind)
        bits = BITS.get(kind) if name.endswith(".weight") else None
        got = values(model.tensors, name, bits)
        assert got.shape == expected.shape, name
        assert np.array_equal(got, expected), name
    assert model.tensor_types["a.weight"] == kind.name


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_the_packing_is_mlx_s(bits: int) -> None:
    rng = np.random.default_rng(bits)
    q = rng.integers(0, 2**bits, (4, 256)).astype(np.uint8)
    q[:, ::32], q[:, 1::32] = 0, 2**bits - 1  # every group spans 0..max: scale ±1, bias 0|max
    weight, scales, biases = mx.quantize(mx.array(q.astype(np.float32)), group_size=32, bits=bits)
    # mx.quantize picks scale -1, bias max: it packs max - q
    assert (np.array(scales) == -1).all() and (np.array(biases) == 2**bits - 1).all()
    assert np.array_equal(pack(2**bits - 1 - q, bits), np.array(weight))
    ones, zeros = mx.ones(scales.shape), mx.zeros(scales.shape)
    unpacked = mx.dequantize(mx.array(pack(q, bits)), ones, zeros, group_size=32, bits=bits)
    assert np.array_equal(np.array(unpacked), q)


def test_the_32_blocks_are_what_mx_load_gives(tmp_path: Path) -> None:
    """Q4_0, Q4_1 and Q8_0 read as MLX's own GGUF reader reads them (bits, dtypes and all)."""
    data = np.random.default_rng(0).standard_normal((2, 64, 256)).astype(np.float32)
    kinds = [Q.Q4_0, Q.Q4_1, Q.Q8_0]
    path = write_tensors(
        tmp_path / "t.gguf", {f"{k.name}.weight": (k, gguf.quants.quantize(data, k)) for k in kinds}
    )
    model, loaded = read_gguf(path), mx.load(str(path))
    assert isinstance(loaded, dict) and set(model.tensors) == set(loaded)
    for name, tensor in loaded.items():
        assert model.tensors[name].dtype == tensor.dtype, name
        assert mx.array_equal(model.tensors[name], tensor).item(), name


def test_scales_are_float16_only_when_exact() -> None:
    rng = np.random.default_rng(0)
    raw = random_blocks(Q.Q4_K, (4, 512), rng)
    decoded = decode(raw, "Q4_K")
    assert isinstance(decoded, Quantized) and decoded.scales.dtype == np.float32
    raw.reshape(-1, 144)[:, 4:16] = 1  # every 6-bit scale and min 1 (or 0): d, dmin are exact
    decoded = decode(raw, "Q4_K")
    assert isinstance(decoded, Quantized) and decoded.scales.dtype == np.float16
    q6 = random_blocks(Q.Q6_K, (2, 256), rng)
    assert decode(q6, "Q6_K").dtype == np.float32  # type: ignore[union-attr]
    blocks = q6.reshape(-1, 210)
    blocks[:, 192:208] = 3  # scales 3 and a power-of-two d: every d * 3 * (q - 32) is a float16
    blocks[:, 208:210] = np.array([[2.0**-10]], np.float16).view(np.uint8)
    assert decode(q6, "Q6_K").dtype == np.float16  # type: ignore[union-attr]
    assert np.array_equal(
        decode(q6, "Q6_K").astype(np.float32),  # type: ignore[union-attr]
        gguf.quants.dequantize(q6, Q.Q6_K),
    )


def test_a_big_tensor_is_decoded_in_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = random_blocks(Q.Q5_K, (7, 512), np.random.default_rng(3))
    whole = decode(raw, "Q5_K")
    monkeypatch.setattr("mlxserve.registry.gguf_quants.CHUNK_ELEMENTS", 1024)  # 2 rows a slice
    sliced = decode(raw, "Q5_K")
    assert isinstance(whole, Quantized) and isinstance(sliced, Quantized)
    for part in ("weight", "scales", "biases"):
        assert np.array_equal(getattr(whole, part), getattr(sliced, part)), part


def test_every_decoded_type_is_supported() -> None:
    for kind in KINDS:
        block, size = gguf.GGML_QUANT_SIZES[kind]
        spec = TYPES[kind.name]
        assert (spec.block, spec.size) == (block, size)
        assert spec.bits == BITS.get(kind)


# A Q4_K_M-like mix (llama.cpp's Q4_K_M: Q4_K, with Q6_K for the head and some attn_v and
# ffn_down), with Q5_0, Q5_K and Q8_0 besides, and a Q6_K attn_k, whose float rows are put
# back in Hugging Face's rotary order like the packed ones.
MIX = {
    "token_embd": Q.Q8_0,
    "output": Q.Q6_K,
    "attn_q": Q.Q4_K,
    "attn_k": Q.Q4_K,
    "attn_v": Q.Q6_K,
    "attn_output": Q.Q5_0,
    "ffn_gate": Q.Q4_K,
    "ffn_up": Q.Q4_K,
    "ffn_down": Q.Q5_K,
}
LAYER_1 = {"attn_k": Q.Q6_K, "attn_v": Q.Q4_K, "ffn_down": Q.Q6_K, "attn_output": Q.Q5_1}


def mixed_type(name: str, shape: tuple[int, ...]) -> Q:
    parts = name.split(".")
    if len(parts) == 2 and parts[0] in MIX:  # token_embd.weight, output.weight
        return MIX[parts[0]]
    if len(parts) == 4 and parts[2] in MIX:  # blk.N.attn_q.weight
        return LAYER_1.get(parts[2], MIX[parts[2]]) if parts[1] == "1" else MIX[parts[2]]
    return Q.F32


@pytest.fixture(scope="module")
def mixed_gguf(
    tmp_path_factory: pytest.TempPathFactory, builtin_families: dict[str, ModelFamily]
) -> tuple[Path, Path]:
    """(a tiny Llama, wide enough for K-quants' 256-blocks, as a mixed GGUF; mlx-lm's
    checkpoint of the gguf package's float32 decode of that file)."""
    root = tmp_path_factory.mktemp("mixed")
    overrides = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2}
    checkpoint = write_tiny_checkpoint(
        builtin_families["llama"], root / "m", overrides=overrides, seed=1
    )
    path = write_gguf(checkpoint, root / "mixed.gguf", "llama", tensor_types=mixed_type)
    return path, reference_checkpoint(checkpoint, path, root / "reference")


def reference_checkpoint(checkpoint: Path, gguf_path: Path, dest: Path) -> Path:
    """The checkpoint with the GGUF's weights, as the gguf package decodes them, under the
    checkpoint's names (by the gguf package's name map), q and k rows in their rotary order."""
    config = json.loads((checkpoint / "config.json").read_text())
    names = gguf.get_tensor_name_map(ARCHITECTURES["llama"], config["num_hidden_layers"])
    hf_names = {
        names.get_name(n, try_suffixes=(".weight", ".bias")): n
        for n in mx.load(str(checkpoint / "model.safetensors"))
    }
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    weights = {}
    for tensor in gguf.GGUFReader(gguf_path).tensors:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        name = hf_names[tensor.name]
        projection = name.split(".")[-2]
        if projection in heads:  # the inverse of llama.cpp's row order
            rows = data.shape[0]
            grouped = data.reshape(heads[projection], rows // heads[projection] // 2, 2, -1)
            data = grouped.swapaxes(1, 2).reshape(data.shape)
        weights[name] = mx.array(data)
    shutil.copytree(checkpoint, dest, ignore=shutil.ignore_patterns("*.safetensors"))
    mx.save_safetensors(str(dest / "model.safetensors"), weights)
    return dest


def mlx_lm_tokens(path: Path, prompt: list[int], steps: int = 16) -> list[int]:
    model, _ = load_model(path)
    sampler = lambda x: mx.argmax(x, -1)  # noqa: E731
    tokens = generate_step(mx.array(prompt), model, max_tokens=steps, sampler=sampler)
    return [int(token) for token, _ in tokens]


def test_a_q4_k_m_like_gguf_gives_mlx_lm_s_tokens_of_its_decode(
    tmp_path: Path, plugins: Plugins, mixed_gguf: tuple[Path, Path]
) -> None:
    path, reference = mixed_gguf
    kinds = {t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert kinds == {Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.F32}
    models = registry(tmp_path, plugins, gguf=path)
    config = json.loads((models.checkpoint("gguf") / "config.json").read_text())
    layers = "model.layers"
    assert config["quantization"] == {
        "group_size": 32,
        "bits": 4,
        "model.embed_tokens": {"group_size": 32, "bits": 8},
        **{f"{layers}.{i}.self_attn.o_proj": {"group_size": 32, "bits": 5} for i in (0, 1)},
        f"{layers}.0.mlp.down_proj": {"group_size": 32, "bits": 5},
    }
    tokens = greedy(models.load("gguf"), PROMPT)
    assert tokens == mlx_lm_tokens(reference, PROMPT) and len(set(tokens)) > 1
    # the float (Q6_K) modules of the otherwise quantized model load as float Linears
    model, _ = load_model(models.checkpoint("gguf"))
    layer = model.model.layers[1]
    assert type(model.lm_head) is nn.Linear and type(layer.self_attn.k_proj) is nn.Linear
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    assert isinstance(layer.self_attn.q_proj, nn.QuantizedLinear)
    assert layer.self_attn.q_proj.bits == 4 and layer.self_attn.o_proj.bits == 5


def test_a_big_endian_gguf_is_refused(tmp_path: Path) -> None:
    writer = gguf.GGUFWriter(str(tmp_path / "be.gguf"), "llama", endianess=gguf.GGUFEndian.BIG)
    writer.add_block_count(1)
    raw = random_blocks(Q.Q4_K, (2, 256), np.random.default_rng(0))
    writer.add_tensor("a.weight", raw, raw_dtype=Q.Q4_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match="be.gguf: a big-endian GGUF"):
        read_gguf(tmp_path / "be.gguf")
