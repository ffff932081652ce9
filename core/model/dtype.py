"""The dtype a model computes in: float32 on the CPU backend, where only float32 matmuls use
BLAS (float16/bfloat16 matmuls there run several times slower). Quantized layers keep their
packed weights where mlxserve's native CPU kernel computes them (core/cpu/qmm.py), and are
dequantized to float32 where it cannot (MLX's own CPU quantized matmul is slower still)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten
from mlx_lm.models.mla import MultiLinear, QuantizedMultiLinear
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from mlxserve.core.cpu.packed import PACKED_TYPES, pack_quantized, packable
from mlxserve.core.cpu.qmm import unavailable_reason
from mlxserve.core.distributed.cluster import Cluster, available_memory
from mlxserve.core.model.layout import DecoderLayout

log = logging.getLogger(__name__)


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def on_cpu_backend() -> bool:
    """Whether MLX computes on the CPU (the default device, or no Metal/CUDA at all)."""
    if mx.default_device() == mx.cpu:
        return True
    metal = hasattr(mx, "metal") and mx.metal.is_available()
    cuda = hasattr(mx, "cuda") and mx.cuda.is_available()
    return not (metal or cuda)


def wants_float32(setting: str) -> bool:
    """``[performance] compute_dtype``: "float32", "model", or "auto" (float32 on the CPU)."""
    return setting == "float32" or (setting == "auto" and on_cpu_backend())


def keeps_packed(setting: str) -> bool:
    """Whether quantized layers stay packed, computed by the native CPU kernel: with
    ``compute_dtype = "auto"`` on the CPU backend, where the kernel is built and loads."""
    return setting == "auto" and on_cpu_backend() and unavailable_reason() is None


def _dequantized(q: nn.Module) -> mx.array:
    return mx.dequantize(
        q.weight,
        q.scales,
        getattr(q, "biases", None),
        q.group_size,
        q.bits,
        mode=q.mode,
        global_scale=getattr(q, "global_scale", None),
        dtype=mx.float32,
    )


def _linear(q: nn.Module) -> nn.Module:
    weight = _dequantized(q)
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in q)
    linear.weight = weight
    if "bias" in q:
        linear.bias = q.bias
    return linear


def _embedding(q: nn.Module) -> nn.Module:
    weight = _dequantized(q)
    embedding = nn.Embedding(*weight.shape)
    embedding.weight = weight
    return embedding


def _switch_linear(q: nn.Module) -> nn.Module:
    weight = _dequantized(q)
    experts, output_dims, input_dims = weight.shape
    switch = SwitchLinear(input_dims, output_dims, experts, bias="bias" in q)
    switch.weight = weight
    if "bias" in q:
        switch.bias = q.bias
    return switch


def _multi_linear(q: nn.Module) -> nn.Module:
    weight = _dequantized(q)
    heads, output_dims, input_dims = weight.shape
    multi = MultiLinear(input_dims, output_dims, heads)
    multi.weight = weight
    return multi


_DEQUANTIZERS: dict[type, Callable[[nn.Module], nn.Module]] = {
    nn.QuantizedLinear: _linear,
    nn.QuantizedEmbedding: _embedding,
    QuantizedSwitchLinear: _switch_linear,
    QuantizedMultiLinear: _multi_linear,
}


def _is_quantized(module: nn.Module) -> bool:
    return "scales" in module and hasattr(module, "bits")


def _arrays(module: nn.Module) -> dict[str, mx.array]:
    return {k: v for k, v in module.items() if isinstance(v, mx.array)}


def _lower_precision(dtype: mx.Dtype) -> bool:
    return mx.issubdtype(dtype, mx.floating) and dtype != mx.float32


def stored_precision(model: nn.Module) -> tuple[set[str], set[int]]:
    """The floating dtypes other than float32, and the quantized bit widths, of the model."""
    floats: set[str] = set()
    bits: set[int] = set()
    for _, module in model.named_modules():
        if _is_quantized(module):
            bits.add(module.bits)
        floats.update(
            str(a.dtype).removeprefix("mlx.core.")
            for a in _arrays(module).values()
            if _lower_precision(a.dtype)
        )
    return floats, bits


def float32_nbytes(model: nn.Module, needed: Callable[[str], bool], *, packed: bool = False) -> int:
    """Bytes the weights ``needed`` accepts (by name) take once computed in float32 (with
    ``packed``, the layers the native kernel computes keep their size)."""
    total = 0
    for path, module in model.named_modules():
        prefix = f"{path}." if path else ""
        arrays = _arrays(module)
        if packed and packable(module):
            total += sum(a.nbytes for k, a in arrays.items() if needed(prefix + k))
            continue
        if _is_quantized(module):
            if needed(f"{prefix}weight"):
                weight = arrays["weight"]
                total += weight.size * (32 // module.bits) * 4
                total += arrays["bias"].size * 4 if "bias" in arrays else 0
            continue
        for name, array in arrays.items():
            if needed(prefix + name):
                floating = mx.issubdtype(array.dtype, mx.floating)
                total += array.size * 4 if floating else array.nbytes
    return total


def to_float32(model: nn.Module, *, packed: bool = False) -> list[str]:
    """Make ``model`` compute in float32, lazily (nothing is evaluated): cast its floating
    weights and dequantize its quantized layers (with ``packed``, those the native kernel
    computes keep their packed weights and scales). Returns the quantized layers it cannot
    dequantize (they stay quantized, with float32 scales)."""
    kept = set(pack_quantized(model)) if packed else set()
    model.apply(
        lambda a: a.astype(mx.float32) if _lower_precision(a.dtype) else a,
        lambda parent, key, value: (
            nn.Module.valid_parameter_filter(parent, key, value)
            and not isinstance(value, PACKED_TYPES)
            and not isinstance(parent, PACKED_TYPES)
        ),
    )
    replacements: list[tuple[str, nn.Module]] = []
    left: list[str] = []
    for path, module in model.named_modules():
        dequantize = _DEQUANTIZERS.get(type(module))
        if path in kept:
            continue
        if dequantize is not None:
            replacements.append((path, dequantize(module)))
        elif _is_quantized(module):
            left.append(path)
    if replacements:
        model.update_modules(tree_unflatten(replacements))
    return left


def _describe(floats: set[str], bits: set[int]) -> str:
    parts = sorted(floats) + [f"{b}-bit" for b in sorted(bits)]
    return ", ".join(parts) or "float32"


def settle_compute_dtype(
    name: str,
    layout: DecoderLayout,
    setting: str,
    *,
    needed: Callable[[str], bool],
    ways: int,
    reserved_bytes: int,
    cluster: Cluster,
) -> None:
    """Make the model of ``layout`` compute in the dtype ``setting`` asks for, if memory allows.

    ``needed`` names the weights this rank keeps, ``ways`` how many ranks share each of them
    (tensor parallelism). Every rank must call this at the same time: they decide together,
    so that the hidden states they pass each other have one dtype.
    """
    floats, bits = stored_precision(layout.model)
    stored = _describe(floats, bits)
    if not (floats or bits):
        log.info("model %s: computing in float32, as stored", name)
        return
    if not wants_float32(setting):
        log.info("model %s: computing in %s, as stored (compute_dtype = %r)", name, stored, setting)
        return
    packed = bool(bits) and keeps_packed(setting)
    if bits and not packed and setting == "auto":
        log.info("model %s: the native quantized CPU kernel is off: %s", name, unavailable_reason())
    need = float32_nbytes(layout.model, needed, packed=packed) // ways
    room = available_memory() - reserved_bytes
    fits = cluster.gather(int(need <= room))
    if not all(fits):
        short = [rank for rank, ok in enumerate(fits) if not ok]
        where = "" if not cluster.distributed else f" on rank(s) {short}"
        log.warning(
            "model %s: keeping %s: float32 would need %s, %s available%s "
            "(free memory minus [kv_cache] reserved_memory_mb)",
            name,
            stored,
            _size(need),
            _size(max(room, 0)),
            where,
        )
        return
    left = to_float32(layout.model, packed=packed)
    layout.hidden_dtype = mx.float32
    changes = [f"{', '.join(sorted(floats))} → float32"] if floats else []
    if bits:
        done = "kept packed (native CPU kernel)" if packed else "dequantized"
        changes.append(f"{'/'.join(map(str, sorted(bits)))}-bit layers {done}")
    if left:
        log.warning(
            "model %s: %d quantized layer(s) of a kind mlxserve cannot dequantize stay "
            "quantized: %s",
            name,
            len(left),
            ", ".join(left[:5]) + (" ..." if len(left) > 5 else ""),
        )
    log.info(
        "model %s: computing in float32 (%s): %s of weights%s",
        name,
        ", ".join(changes),
        _size(need),
        "" if ways == 1 else " on this rank",
    )
