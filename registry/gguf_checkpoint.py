"""GGUF files as checkpoints: one is converted into an MLX checkpoint folder (config.json,
model.safetensors under mlx-lm's names, tokenizer files), which then loads like any other.

The file is read with the ``gguf`` package's memory-mapped reader, not ``mx.load`` (MLX 0.32's
GGUF reader decodes Q4_K wrongly, fails on Q3_K, Q5_0, Q5_K and skips MXFP4 without a word).
F32, F16 and BF16 tensors are read as they are; the quantized types of ``gguf_quants.TYPES``
are decoded exactly, into MLX's affine quantization (group size 32) or into floats. Other
types are refused by name.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from pathlib import Path
from typing import Any, BinaryIO

import mlx.core as mx
import numpy as np

from mlxserve.core.errors import ModelNotFoundError, UnsupportedModelError
from mlxserve.plugins.family import ModelFamily
from mlxserve.plugins.gguf_mapping import GGUFModel, listed
from mlxserve.registry.gguf_quants import GROUP_SIZE, TYPES, Quantized, decode
from mlxserve.registry.gguf_tokenizer import save_gguf_tokenizer
from mlxserve.registry.plugins import Plugins

FLOAT_TYPES = ("F32", "F16", "BF16")
SUPPORTED_TYPES = (*FLOAT_TYPES, *TYPES)
QUANT_GROUP_SIZE = GROUP_SIZE  # every quantized type becomes MLX's affine group of 32
# The sizes of GGUF's fixed-size metadata value types, by type number (8 is a string, 9 an array).
_VALUE_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


def gguf_file_of(path: Path) -> Path | None:
    """The GGUF file a local source names: the file itself, or the one .gguf in a folder
    without config.json; None for anything else (e.g. an MLX checkpoint folder)."""
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"{path}: no such GGUF file")
        return path
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    files = sorted(path.glob("*.gguf"))
    if len(files) > 1:
        raise ModelNotFoundError(
            f"{path}: holds {len(files)} .gguf files ({listed([f.name for f in files])}); "
            f"make the source the path of one of them"
        )
    return files[0] if files else None


def write_gguf_checkpoint(
    gguf_path: Path, dest: Path, plugins: Plugins, family_name: str | None = None
) -> Path:
    """Convert a GGUF file into an MLX checkpoint folder ``dest`` (which must exist).

    The family that claims the file's architecture maps its config and tensors; with
    ``family_name`` (a ``[models.NAME] family``) that family does, if it claims it too.
    """
    family = converting_family(gguf_path, plugins, family_name)
    gguf = read_gguf(gguf_path)
    config = family.gguf_config(gguf)
    weights = family.gguf_weights(gguf, config)
    quantization = quantization_of(weights)
    if quantization:
        config["quantization"] = quantization
    config["mlxserve"] = {
        "description": describe(gguf),
        "gguf": {"file": gguf_path.name, "architecture": gguf.architecture, "family": family.name},
    }
    mx.save_safetensors(str(dest / "model.safetensors"), weights, metadata={"format": "mlx"})
    save_gguf_tokenizer(gguf, dest)
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return dest


def read_gguf(path: Path) -> GGUFModel:
    """The file's metadata and tensors; an error names what mlxserve cannot read.

    A quantized tensor ``NAME.weight`` becomes MLX's affine triple ``NAME.weight`` (uint32),
    ``NAME.scales`` and ``NAME.biases``, or floats for the 16-element types (Q6_K, Q3_K, Q2_K);
    one that is not a ``.weight`` (no quantized module could take it) becomes float32.
    """
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # the reader trusts the header: a crafted one fails anyhow
        raise UnsupportedModelError(f"{path}: not a GGUF file mlxserve can read ({exc})") from exc
    _check_tensor_types(path, reader)
    if reader.endianess != gguf.GGUFEndian.LITTLE:  # blocks are decoded as little-endian
        raise UnsupportedModelError(f"{path.name}: a big-endian GGUF, which mlxserve cannot read")
    metadata = _metadata(reader)
    if int(metadata.get("split.count", 1)) > 1:
        raise UnsupportedModelError(
            f"{path.name}: it is one part of a GGUF split into {metadata['split.count']} files; "
            f"merge them into one first (llama.cpp's `llama-gguf-split --merge`)"
        )
    tensors: dict[str, mx.array] = {}
    for tensor in reader.tensors:
        tensors.update(_read_tensor(path, tensor.name, tensor.tensor_type.name, tensor.data))
    return GGUFModel(
        path,
        str(metadata.get("general.architecture", "")),
        metadata,
        tensors,
        tensor_types={t.name: t.tensor_type.name for t in reader.tensors},
        num_parameters=sum(int(t.n_elements) for t in reader.tensors),
    )


def _read_tensor(path: Path, name: str, kind: str, data: np.ndarray) -> dict[str, mx.array]:
    """One tensor, under its name (and its ``.scales``, ``.biases`` if it stays quantized)."""
    if kind == "BF16":  # its 2-byte values, as bytes: viewed, so read bit for bit
        return {name: mx.array(np.ascontiguousarray(data)).view(mx.bfloat16)}
    if kind in FLOAT_TYPES:
        return {name: mx.array(np.ascontiguousarray(data))}
    try:
        decoded = decode(data, kind)
    except ValueError as exc:
        raise UnsupportedModelError(f"{path.name}: cannot read its tensor {name} ({exc})") from exc
    if not isinstance(decoded, Quantized):
        return {name: mx.array(decoded)}
    weight, scales, biases = (mx.array(a) for a in (decoded.weight, decoded.scales, decoded.biases))
    if name.endswith(".weight") and weight.ndim >= 2:
        module = name.removesuffix(".weight")
        return {name: weight, f"{module}.scales": scales, f"{module}.biases": biases}
    values = mx.dequantize(
        weight.reshape(-1, weight.shape[-1]),
        scales.astype(mx.float32).reshape(-1, scales.shape[-1]),
        biases.astype(mx.float32).reshape(-1, biases.shape[-1]),
        group_size=QUANT_GROUP_SIZE,
        bits=decoded.bits,
        dtype=mx.float32,
    )
    return {name: values.reshape(*weight.shape[:-1], -1)}


def _metadata(reader: Any) -> dict[str, Any]:
    """Every metadata key as Python values; a float32 as the shortest decimal that is it
    (1e-05, not 9.99e-06). The reader's own ``GGUF.*`` header fields are left out."""
    from gguf import GGUFValueType

    metadata = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        if field.types == [GGUFValueType.FLOAT32]:
            value = float(str(np.float32(value)))
        metadata[key] = value
    return metadata


def _check_tensor_types(path: Path, reader: Any) -> None:
    unsupported: dict[str, list[str]] = {}
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        if kind not in SUPPORTED_TYPES:
            unsupported.setdefault(kind, []).append(tensor.name)
    if unsupported:
        found = "; ".join(f"{kind} ({listed(names, 2)})" for kind, names in unsupported.items())
        raise UnsupportedModelError(
            f"{path.name}: mlxserve cannot read GGUF tensor type {found}; it reads "
            f"{', '.join(SUPPORTED_TYPES)}: use a GGUF quantized to one of those (e.g. Q4_K_M), "
            f"or an MLX checkpoint of the model"
        )


def converting_family(
    gguf_path: Path, plugins: Plugins, family_name: str | None = None
) -> ModelFamily:
    """The family that converts a GGUF file, known from its header alone: a file of an
    architecture no family converts is refused, naming it, before its tensors are read."""
    return _converting_family(plugins, gguf_architecture(gguf_path), family_name)


def gguf_architecture(path: Path) -> str:
    """A GGUF file's ``general.architecture`` (``""`` if it has none), read from its header:
    only the metadata values before that key are read, and they are skipped, not parsed."""
    try:
        with path.open("rb") as file:
            if file.read(4) != b"GGUF":
                raise ValueError("no GGUF magic number")
            (version,) = struct.unpack("<I", _read(file, 4))
            order = "<" if version & 0xFFFF else ">"  # a big-endian file's version reads swapped
            _, count = struct.unpack(f"{order}QQ", _read(file, 16))
            for _ in range(count):
                key = _read_string(file, order)
                (kind,) = struct.unpack(f"{order}I", _read(file, 4))
                if key == "general.architecture" and kind == _STRING:
                    return _read_string(file, order)
                _skip_value(file, order, kind)
    except (OSError, ValueError, UnicodeDecodeError, struct.error) as exc:
        raise UnsupportedModelError(f"{path}: not a GGUF file mlxserve can read ({exc})") from exc
    return ""


def _read(file: BinaryIO, size: int) -> bytes:
    data = file.read(size)
    if len(data) != size:
        raise ValueError("the header ends early")
    return data


def _read_string(file: BinaryIO, order: str) -> str:
    (size,) = struct.unpack(f"{order}Q", _read(file, 8))
    return _read(file, size).decode("utf-8")


def _skip_value(file: BinaryIO, order: str, kind: int) -> None:
    if kind == _STRING:
        (size,) = struct.unpack(f"{order}Q", _read(file, 8))
        file.seek(size, 1)
    elif kind == _ARRAY:
        item, count = struct.unpack(f"{order}IQ", _read(file, 12))
        if item in _VALUE_SIZES:
            file.seek(_VALUE_SIZES[item] * count, 1)
        else:
            for _ in range(count):
                _skip_value(file, order, item)
    elif kind in _VALUE_SIZES:
        file.seek(_VALUE_SIZES[kind], 1)
    else:
        raise ValueError(f"unknown metadata value type {kind}")


def _converting_family(plugins: Plugins, architecture: str, family_name: str | None) -> ModelFamily:
    if family_name:
        family = plugins.family(family_name)
        if architecture in family.gguf_architectures:
            return family
    return plugins.family_for_gguf(architecture)


def quantization_of(weights: dict[str, mx.array]) -> dict[str, Any] | None:
    """mlx-lm's ``quantization`` block: the most common group size and bits, and an entry of
    its own for each module quantized otherwise (e.g. an 8-bit embedding beside 4-bit layers)."""
    found = {}
    for name, scales in weights.items():
        if name.endswith(".scales"):
            module = name.removesuffix(".scales")
            in_dims = scales.shape[-1] * QUANT_GROUP_SIZE
            bits = weights[f"{module}.weight"].shape[-1] * 32 // in_dims
            found[module] = {"group_size": QUANT_GROUP_SIZE, "bits": bits}
    if not found:
        return None
    counts = Counter(json.dumps(q, sort_keys=True) for q in found.values())
    common = json.loads(counts.most_common(1)[0][0])
    return {**common, **{m: q for m, q in found.items() if q != common}}


def describe(gguf: GGUFModel) -> str:
    """``NAME (SIZE parameters, TYPE GGUF)`` from the file's ``general.*`` metadata."""
    metadata = gguf.metadata
    name = metadata.get("general.name") or metadata.get("general.basename") or gguf.path.stem
    count = gguf.num_parameters
    size = metadata.get("general.size_label") or (
        f"{count / 1e9:.1f}B" if count >= 1e9 else f"{count / 1e6:.0f}M"
    )
    main_type = Counter(gguf.tensor_types.values()).most_common(1)[0][0]
    return f"{name} ({size} parameters, {main_type} GGUF)"
