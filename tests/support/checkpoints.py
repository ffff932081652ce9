"""Copies of the tiny llama in the dtypes real checkpoints ship in (bfloat16, 4-bit), for the
compute-dtype tests, and what to look at in a model once loaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import load, quantize_model

from mlxserve.core.config.schema import Config

from .server import write_config


def _copy_with_weights(source: Path, dest: Path, weights: dict, config: dict) -> Path:
    shutil.copytree(source, dest)
    (dest / "model.safetensors").unlink()
    mx.save_safetensors(str(dest / "model.safetensors"), weights, metadata={"format": "mlx"})
    (dest / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return dest


def write_bfloat16_copy(source: Path, dest: Path) -> Path:
    """``source`` with every weight in bfloat16 (and torch_dtype saying so), at ``dest``."""
    weights = {
        k: v.astype(mx.bfloat16) for k, v in mx.load(str(source / "model.safetensors")).items()
    }
    config = json.loads((source / "config.json").read_text()) | {"torch_dtype": "bfloat16"}
    return _copy_with_weights(source, dest, weights, config)


def write_4bit_copy(source: Path, dest: Path) -> Path:
    """``source`` quantized by mlx_lm to 4 bits (groups of 64), at ``dest``."""
    model, _ = load(str(source))
    config = json.loads((source / "config.json").read_text())
    model, config = quantize_model(model, config, group_size=64, bits=4)
    weights = dict(tree_flatten(model.parameters()))
    return _copy_with_weights(source, dest, weights, config)


def compute_dtype_config(tmp_path: Path, source: Path, setting: str = "auto") -> Config:
    """Serves ``source`` as model "m" with [performance] compute_dtype = ``setting``."""
    return write_config(
        tmp_path,
        f"""
[registry]
default_model = "m"
cache_dir = "{tmp_path / "cache"}"
[models.m]
source = "{source}"
[performance]
compute_dtype = "{setting}"
[kv_cache]
max_sequence_length = 256
reserved_memory_mb = 0
""",
    )


def param_dtypes(model: nn.Module) -> set[mx.Dtype]:
    return {p.dtype for _, p in tree_flatten(model.parameters())}


def quantized_modules(model: nn.Module) -> list[str]:
    return [path for path, m in model.named_modules() if "scales" in m]
