"""Quantized layers that keep their packed weights and compute in float32 on the CPU.

They are mlx's own ``QuantizedLinear`` and ``QuantizedEmbedding`` (so model code that checks
for them still finds them) whose matmul goes through ``qmm.quantized_matmul``: the native
kernel reads the packed bits and dequantizes in registers, so a decode step reads 4 or 8 bits
per weight, not the 32 a dequantized float32 copy costs. Inputs and outputs are float32.
"""

from __future__ import annotations

from typing import Any, TypeVar

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from mlxserve.core.cpu.qmm import quantized_matmul

_Packed = TypeVar("_Packed", bound=nn.Module)


def _adopt(cls: type[_Packed], quantized: nn.Module) -> _Packed:
    """A ``cls`` holding ``quantized``'s arrays and settings (no copy, nothing quantized)."""
    packed = cls.__new__(cls)
    nn.Module.__init__(packed)
    for key, value in quantized.items():
        packed[key] = value
    for setting in ("group_size", "bits", "mode", "num_embeddings", "dims"):
        if hasattr(quantized, setting):
            setattr(packed, setting, getattr(quantized, setting))
    packed.freeze()
    return packed


def _matmul(layer: nn.Module, x: mx.array) -> mx.array:
    return quantized_matmul(
        x,
        layer["weight"],
        layer["scales"],
        layer.get("biases"),
        group_size=layer.group_size,
        bits=layer.bits,
    )


class PackedLinear(nn.QuantizedLinear):
    """``nn.QuantizedLinear`` computed by the native CPU kernel."""

    def __call__(self, x: mx.array) -> mx.array:
        y = _matmul(self, x)
        return y + self["bias"] if "bias" in self else y


class PackedEmbedding(nn.QuantizedEmbedding):
    """``nn.QuantizedEmbedding`` whose rows come out in float32 and whose ``as_linear`` (a
    tied output head) runs on the native CPU kernel."""

    def __call__(self, x: mx.array) -> mx.array:
        biases = self.get("biases")  # rows in float32 before they are scaled: no rounding
        return mx.dequantize(
            self["weight"][x],
            scales=self["scales"][x].astype(mx.float32),
            biases=biases[x].astype(mx.float32) if biases is not None else None,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
            dtype=mx.float32,
        )

    def as_linear(self, x: mx.array) -> mx.array:
        return _matmul(self, x)


_PACKED: dict[type, type[nn.Module]] = {
    nn.QuantizedLinear: PackedLinear,
    nn.QuantizedEmbedding: PackedEmbedding,
}


PACKED_TYPES = (PackedLinear, PackedEmbedding)


def packable(module: nn.Module) -> bool:
    """Whether ``module`` is a quantized layer the packed classes compute exactly."""
    return type(module) in _PACKED and getattr(module, "mode", "affine") == "affine"


def pack_quantized(model: nn.Module) -> list[str]:
    """Swap every packable quantized layer of ``model`` for its packed twin; their paths."""
    swaps: list[tuple[str, Any]] = [
        (path, _adopt(_PACKED[type(module)], module))
        for path, module in model.named_modules()
        if packable(module)
    ]
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    return [path for path, _ in swaps]
