"""Loading a checkpoint's weights, only those of the layers this rank runs."""

from __future__ import annotations

from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.utils import load_config, load_model

from mlxserve.core.cpu.blas import cpu_split
from mlxserve.core.cpu.parallel_linear import parallelize_linears
from mlxserve.core.model.layout import DecoderLayout
from mlxserve.core.model.stages import PipelineStage

# config.json -> its (Model, ModelArgs) classes, as ModelFamily.model_classes gives them.
ModelClasses = Callable[[dict[str, Any]], tuple[type[nn.Module], type[Any]]]


def build_model(model_classes: ModelClasses, config: dict[str, Any]) -> nn.Module:
    """``Model(ModelArgs.from_dict(config))``, mlx-lm's way; nothing is loaded."""
    model_class, args_class = model_classes(config)
    # An mlx-lm Model class takes its ModelArgs (nn.Module's own __init__ takes nothing).
    make: Callable[..., nn.Module] = model_class
    return make(args_class.from_dict(config))


def build_lazy(
    path: Path, model_classes: ModelClasses, *, partial: bool = False
) -> tuple[nn.Module, dict[str, Any]]:
    """The checkpoint's model with its weights mapped but not read (nothing is evaluated).

    ``partial``: only some safetensors files are there (a rank downloads its own layers'
    files); the parts they do not cover must be dropped before anything is evaluated.
    """
    model, config = load_model(
        Path(path), lazy=True, strict=not partial, get_model_classes=model_classes
    )
    model.eval()
    return model, config


def build_skeleton(
    path: Path, model_classes: ModelClasses, weight_keys: Collection[str]
) -> nn.Module:
    """The checkpoint's model from config.json and its weights' names alone (nothing read),
    quantized where the weights are, so that its parameter sizes are the real ones."""
    config = load_config(Path(path))
    model = build_model(model_classes, config)
    quantization = config.get("quantization")
    if quantization:
        nn.quantize(
            model,
            group_size=quantization["group_size"],
            bits=quantization["bits"],
            class_predicate=lambda p, m: (
                hasattr(m, "to_quantized")
                and f"{p}.scales" in weight_keys
                and quantization.get(p, True)  # a module's own group size and bits, if it has them
            ),
        )
    return model


def materialize(
    layout: DecoderLayout,
    *,
    layers: range | None = None,
    first: bool = True,
    last: bool = True,
    group: Any = None,
    prev_rank: int | None = None,
    next_rank: int | None = None,
) -> PipelineStage:
    """Drop what this stage does not run, then read the rest of the weights into memory.

    Layers are evaluated one at a time, so a layer converted to another dtype (lazily, before
    this) holds its stored copy only until it is converted: peak memory stays near the result.
    """
    if layers is None:
        layers = range(layout.num_layers)
    if (layers.start, layers.stop) != (0, layout.num_layers) or not (first and last):
        layout.keep_only(layers, first=first, last=last)
    for layer in layout.layer_modules:
        mx.eval(layer.parameters())
    mx.eval(layout.model.parameters())
    parallelize_linears(layout.model, cpu_split())
    return PipelineStage(layout, layers, first, last, group, prev_rank, next_rank)


def load_stage(
    path: Path,
    model_classes: ModelClasses,
    make_layout: Callable[[nn.Module], DecoderLayout],
    *,
    layers: range | None = None,
    first: bool = True,
    last: bool = True,
) -> tuple[PipelineStage, dict[str, Any]]:
    """Build a checkpoint's model and load the weights of one pipeline stage.

    Weights are mapped lazily and the parts of the model other stages run are dropped
    before anything is evaluated, so only this stage's weights are ever read into memory.

    Args:
        path: a folder with config.json and safetensors files.
        model_classes: gives the (Model, ModelArgs) classes for the config.
        make_layout: the family's sharding rule.
        layers: the layer indices this stage runs (default: all of them).
        first: whether this stage embeds the tokens.
        last: whether this stage applies the final norm and head.

    Returns:
        The stage and the checkpoint's config.
    """
    model, config = build_lazy(path, model_classes)
    stage = materialize(make_layout(model), layers=layers, first=first, last=last)
    return stage, config
