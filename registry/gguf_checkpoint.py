"""GGUF files as checkpoints: one is converted into an MLX checkpoint folder (config.json,
model.safetensors under mlx-lm's names, tokenizer files), which then loads like any other.

MLX reads F32, F16, Q4_0, Q4_1 and Q8_0 tensors itself (the quantized ones straight into its
own affine format, group size 32); BF16 is read here bit for bit (``mx.load`` would round it to
float16). Other types are refused by name: ``mx.load`` turns some of them into float16 (Q4_K
wrongly, as of MLX 0.32), fails on others and drops a few without a word.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import numpy as np

from mlxserve.core.errors import ModelNotFoundError, UnsupportedModelError
from mlxserve.plugins.family import ModelFamily
from mlxserve.plugins.gguf_mapping import GGUFModel, listed
from mlxserve.registry.gguf_tokenizer import save_gguf_tokenizer
from mlxserve.registry.plugins import Plugins

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0")
QUANT_GROUP_SIZE = 32  # the block of Q4_0, Q4_1 and Q8_0, which MLX keeps as its group


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
    gguf = read_gguf(gguf_path)
    family = _converting_family(plugins, gguf.architecture, family_name)
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
    """The file's metadata and tensors; an error names what mlxserve cannot read."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # the reader trusts the header: a crafted one fails anyhow
        raise UnsupportedModelError(f"{path}: not a GGUF file mlxserve can read ({exc})") from exc
    _check_tensor_types(path, reader)
    try:
        loaded = mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError) as exc:
        raise UnsupportedModelError(f"{path}: MLX cannot read it ({exc})") from exc
    # With return_metadata, mx.load gives (the tensors by name, the metadata).
    tensors, raw_metadata = cast("tuple[dict[str, mx.array], dict[str, Any]]", loaded)
    metadata = {key: _python(value) for key, value in raw_metadata.items()}
    if int(metadata.get("split.count", 1)) > 1:
        raise UnsupportedModelError(
            f"{path.name}: it is one part of a GGUF split into {metadata['split.count']} files; "
            f"merge them into one first (llama.cpp's `llama-gguf-split --merge`)"
        )
    for tensor in reader.tensors:
        if tensor.tensor_type == gguf.GGMLQuantizationType.BF16:
            raw = np.ascontiguousarray(tensor.data)
            tensors[tensor.name] = mx.array(raw).view(mx.bfloat16)
    return GGUFModel(
        path,
        str(metadata.get("general.architecture", "")),
        metadata,
        tensors,
        tensor_types={t.name: t.tensor_type.name for t in reader.tensors},
        num_parameters=sum(int(t.n_elements) for t in reader.tensors),
    )


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
            f"{', '.join(SUPPORTED_TYPES)}: use a GGUF quantized to one of those (Q8_0, Q4_0), "
            f"or an MLX checkpoint of the model"
        )


def _python(value: Any) -> Any:
    if not isinstance(value, mx.array):
        return value
    if value.ndim:
        return value.tolist()
    if value.dtype == mx.float32:  # the shortest decimal that is this float32: 1e-05, not 9.99e-06
        return float(str(np.float32(float(value))))
    return value.item()


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
