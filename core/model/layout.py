"""Where a decoder's parts live: what a generic pipeline runner needs to cut any family."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask

MaskFn = Callable[[mx.array, Any, nn.Module], Any]


def causal_mask(h: mx.array, cache: Any, layer: nn.Module) -> Any:
    """The mask most decoders use: causal, built by the layer's cache when it has one."""
    return create_attention_mask(h, cache)


def _resolve(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _assign(root: nn.Module, path: str, value: Any) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_resolve(root, parent) if parent else root, name, value)


def _parameters(module: nn.Module) -> list[tuple[str, mx.array]]:
    """The module's parameters as (dotted name, array) pairs; nothing is evaluated."""
    from mlx.utils import tree_flatten

    # tree_flatten gives a list unless it is given a dict to fill.
    return cast("list[tuple[str, mx.array]]", tree_flatten(module.parameters()))


@dataclass
class DecoderLayout:
    """A family's sharding rule for pipeline parallelism.

    Attributes are dotted paths into the model (mlx-lm's naming by default). ``head`` is
    ``None`` for tied embeddings: the embedding's ``as_linear`` is the head then.
    ``mask`` builds the attention mask a layer needs from its input and its cache.
    """

    model: nn.Module
    embed: str = "model.embed_tokens"
    layers: str = "model.layers"
    norm: str = "model.norm"
    head: str | None = "lm_head"
    mask: MaskFn = field(default=causal_mask)
    hidden_dtype: mx.Dtype = field(init=False)

    def __post_init__(self) -> None:
        embed = _resolve(self.model, self.embed)
        params = _parameters(embed) if embed is not None else []
        floats = [p.dtype for _, p in params if mx.issubdtype(p.dtype, mx.floating)]
        self.hidden_dtype = floats[0] if floats else mx.float32

    @property
    def hidden_size(self) -> int:
        return self.model.args.hidden_size

    @property
    def vocab_size(self) -> int:
        """The width of the logits: every token id the model can score is below it."""
        return int(self.model.args.vocab_size)

    @property
    def num_layers(self) -> int:
        return len(self.layer_modules)

    @property
    def layer_modules(self) -> list[nn.Module | None]:
        """The decoder layers; None where :meth:`keep_only` dropped one from this stage."""
        return _resolve(self.model, self.layers)

    def embed_tokens(self, tokens: mx.array) -> mx.array:
        return _resolve(self.model, self.embed)(tokens)

    def run_layer(self, index: int, h: mx.array, cache: Any) -> mx.array:
        layer = self.layer_modules[index]
        if layer is None:
            raise ValueError(f"layer {index} is not in this stage")
        return layer(h, self.mask(h, cache, layer), cache=cache)

    def logits(self, h: mx.array) -> mx.array:
        h = _resolve(self.model, self.norm)(h)
        if self.head is None:
            return _resolve(self.model, self.embed).as_linear(h)
        return _resolve(self.model, self.head)(h)

    def layer_nbytes(self) -> list[int]:
        """Bytes of each layer's parameters (from shapes: nothing is evaluated); 0 for a
        layer this stage dropped."""
        return [
            sum(p.nbytes for _, p in _parameters(layer)) if layer is not None else 0
            for layer in self.layer_modules
        ]

    def weight_owner(self, key: str) -> int | str:
        """Which part a weight belongs to: a layer index, or "embed" / "norm" / "head"."""
        prefix = self.layers + "."
        if key.startswith(prefix):
            return int(key[len(prefix) :].split(".", 1)[0])
        for part in ("embed", "norm", "head"):
            path = getattr(self, part)
            if path is not None and key.startswith(path + "."):
                return part
        return "other"

    def weight_needed(self, key: str, layers: range, *, first: bool, last: bool) -> bool:
        """Whether the stage (``layers``, ``first``, ``last``) needs the weight ``key``."""
        owner = self.weight_owner(key)
        if isinstance(owner, int):
            return owner in layers
        if owner == "embed":
            return first or (last and self.head is None)
        if owner in ("norm", "head"):
            return last
        return True

    def keep_only(self, layers: range, *, first: bool, last: bool) -> None:
        """Drop every part this stage does not run, so its weights are never loaded."""
        modules = self.layer_modules
        for i in range(len(modules)):
            if i not in layers:
                modules[i] = None
        if not first and not (last and self.head is None):
            _assign(self.model, self.embed, None)
        if not last:
            _assign(self.model, self.norm, None)
            if self.head is not None:
                _assign(self.model, self.head, None)
