"""Where a decoder's parts live, and how one pipeline stage of it runs.

A stage runs the model's own forward pass (mlx-lm's ``Model.__call__``), so everything the
model does around its layers — embedding scales, per-layer masks and extra arguments, several
residual streams, heads wherever they live — is the model's own code. Cutting it into stages
only swaps the layers another stage runs for stand-ins: the one before this stage's first
layer hands over the hidden state received from the previous stage, the one after its last
layer stops the pass. ``trace`` checks, before a split is trusted, that the hidden state
really flows from each layer to the next untouched.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn

from mlxserve.core.errors import UnsupportedModelError

EMBED_NAMES = ("embed_tokens", "tok_embeddings", "wte", "word_embeddings", "embeddings")
NORM_NAMES = ("norm", "final_norm", "final_layernorm", "ln_f", "norm_f")
HEAD_NAMES = ("lm_head", "output")
DERIVE = ""


class SplitError(UnsupportedModelError):
    """The model cannot be cut into pipeline stages at the asked boundaries."""


def _resolve(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = obj[int(part)] if isinstance(obj, list) else getattr(obj, part)
    return obj


def _assign(root: nn.Module, path: str, value: Any) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_resolve(root, parent) if parent else root, name, value)


def _parameters(module: nn.Module) -> list[tuple[str, mx.array]]:
    """The module's parameters as (dotted name, array) pairs; nothing is evaluated."""
    from mlx.utils import tree_flatten

    # tree_flatten gives a list unless it is given a dict to fill.
    return cast("list[tuple[str, mx.array]]", tree_flatten(module.parameters()))


def _modules(root: nn.Module, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every (dotted path, child) below ``root``: modules and lists of modules."""
    for name, child in root.items():
        path = f"{prefix}{name}"
        if isinstance(child, nn.Module):
            yield path, child
            yield from _modules(child, path + ".")
        elif isinstance(child, list) and child and isinstance(child[0], nn.Module):
            yield path, child
            for i, item in enumerate(child):
                if isinstance(item, nn.Module):
                    yield from _modules(item, f"{path}.{i}.")


def _is_embedding(module: Any) -> bool:
    return isinstance(module, nn.Module) and hasattr(module, "as_linear")


def find_parts(model: nn.Module) -> tuple[str, str | None, str | None, str | None]:
    """(layers, embed, norm, head) dotted paths of an mlx-lm model; head None when tied.

    The layers are the list ``model.layers`` gives (mlx-lm's convention), found in the module
    tree by identity; the embedding and final norm are its owner's; the head is an
    ``lm_head`` or ``output`` on the way from the model to that owner.
    """
    listed = list(model.layers)
    if not listed:
        raise SplitError("the model has no layers")
    layers = next(
        (p for p, c in _modules(model) if isinstance(c, list) and c[0] is listed[0]), None
    )
    if layers is None:
        raise SplitError("model.layers is not a list of modules inside the model")
    owner_path = layers.rpartition(".")[0]
    owner = _resolve(model, owner_path) if owner_path else model
    embed = next(
        (n for n in EMBED_NAMES if _is_embedding(owner.get(n))),
        next((p for p, c in _modules(model) if _is_embedding(c)), None),
    )
    if embed is not None and "." not in embed and owner_path:
        embed = f"{owner_path}.{embed}"
    norm = next((n for n in NORM_NAMES if isinstance(owner.get(n), nn.Module)), None)
    if norm is not None and owner_path:
        norm = f"{owner_path}.{norm}"
    head = None
    parts = owner_path.split(".") if owner_path else []
    for depth in range(len(parts) + 1):
        base = ".".join(parts[:depth])
        module = _resolve(model, base) if base else model
        name = next((n for n in HEAD_NAMES if isinstance(module.get(n), nn.Module)), None)
        if name is not None:
            head = f"{base}.{name}" if base else name
            break
    return layers, embed, norm, head


class _StageDone(Exception):
    def __init__(self, hidden: mx.array) -> None:
        super().__init__("stage done")
        self.hidden = hidden


@dataclass
class _Handover:
    """What the stand-ins around a stage do in one forward pass."""

    hidden: mx.array | None = None


class _Skipped(nn.Module):
    """A layer another stage runs. It answers the original's plain attributes (a model's
    loop may ask, e.g., ``layer.is_linear``) but holds none of its weights."""

    def __init__(self, original: nn.Module, role: str, handover: _Handover) -> None:
        super().__init__()
        for key, value in vars(original).items():
            if not key.startswith("_") and not isinstance(value, (mx.array, nn.Module)):
                object.__setattr__(self, key, value)
        object.__setattr__(self, "_role", role)
        object.__setattr__(self, "_handover", handover)

    def __call__(self, h: Any, *args: Any, **kwargs: Any) -> Any:
        if self._role == "hand_over":
            return self._handover.hidden
        if self._role == "stop":
            raise _StageDone(h)
        return h


class _Unused(nn.Module):
    """A part of the model (embedding, norm, head) this stage never needs."""

    fill = 0.0  # what it gives instead of embeddings (the exactness check varies it)

    def __init__(self, width: int, dtype: mx.Dtype) -> None:
        super().__init__()
        object.__setattr__(self, "_width", width)
        object.__setattr__(self, "_dtype", dtype)

    def __call__(self, x: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        return mx.full((*x.shape[:2], self._width), self.fill, self._dtype)

    def as_linear(self, x: mx.array) -> mx.array:
        raise RuntimeError("a stage without the embedding asked for the tied head")


@dataclass
class LayerCall:
    """One decoder layer's call in a traced forward pass."""

    index: int
    hidden_in: Any
    hidden_out: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


class _Recording(nn.Module):
    def __init__(self, layer: nn.Module, index: int, calls: list[LayerCall]) -> None:
        super().__init__()
        object.__setattr__(self, "_layer", layer)
        object.__setattr__(self, "_index", index)
        object.__setattr__(self, "_calls", calls)

    def __getattr__(self, key: str) -> Any:
        return getattr(object.__getattribute__(self, "_layer"), key)

    def __call__(self, h: Any, *args: Any, **kwargs: Any) -> Any:
        out = self._layer(h, *args, **kwargs)
        self._calls.append(LayerCall(self._index, h, out, args, kwargs))
        return out


@dataclass
class DecoderLayout:
    """A family's sharding rule: where the parts of its model live.

    Attributes are dotted paths into the model; ``""`` (the default) finds them in the model
    (:func:`find_parts`). ``head`` is None for tied embeddings (the embedding's
    ``as_linear`` is the head then). ``run`` is the model's own forward pass; a family whose
    model needs something else overrides it.
    """

    model: nn.Module
    embed: str | None = DERIVE
    layers: str = DERIVE
    norm: str | None = DERIVE
    head: str | None = DERIVE
    hidden_dtype: mx.Dtype = field(init=False)
    _handover: _Handover = field(init=False, default_factory=_Handover)
    _templates: list[Any] | None = field(init=False, default=None)
    _kinds: list[tuple[Any, ...]] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        layers, embed, norm, head = find_parts(self.model)
        self.layers = self.layers or layers
        self.embed = embed if self.embed == DERIVE else self.embed
        self.norm = norm if self.norm == DERIVE else self.norm
        self.head = head if self.head == DERIVE else self.head
        params = _parameters(self._part(self.embed)) if self.embed else []
        floats = [p.dtype for _, p in params if mx.issubdtype(p.dtype, mx.floating)]
        self.hidden_dtype = floats[0] if floats else mx.float32
        self.vocab_size = self._vocab_size()

    def _part(self, path: str | None) -> Any:
        return _resolve(self.model, path) if path else None

    def learned_positions(self) -> str | None:
        """The path of a table of learned position embeddings, if the model has one (it
        cannot run past that table's length)."""
        for path, module in _modules(self.model):
            name = path.rsplit(".", 1)[-1]
            if isinstance(module, nn.Embedding) and (name == "wpe" or "position" in name):
                return path
        return None

    def _vocab_size(self) -> int:
        for part in (self.head, self.embed):
            module = self._part(part)
            if module is not None and "weight" in module:
                return int(module.weight.shape[0])
        args = getattr(self.model, "args", None)
        text = getattr(args, "text_config", None) or {}
        size = getattr(args, "vocab_size", None) or text.get("vocab_size")
        if size is None:
            raise SplitError("cannot tell the model's vocabulary size")
        return int(size)

    @property
    def num_layers(self) -> int:
        return len(self.layer_modules)

    @property
    def layer_modules(self) -> list[nn.Module]:
        """The decoder layers, in order (stand-ins where another stage runs them)."""
        return cast("list[nn.Module]", _resolve(self.model, self.layers))

    def run(self, tokens: mx.array, cache: Sequence[Any]) -> mx.array:
        """The model's forward pass over ``tokens`` with one cache per layer."""
        return self.model(tokens, cache=list(cache))

    def forward(
        self,
        tokens: mx.array,
        caches: Sequence[Any],
        layers: range,
        *,
        hidden: mx.array | None = None,
        as_mlx_lm: bool = False,
    ) -> mx.array:
        """Run ``layers`` (a stage) on ``tokens`` (B, L): the logits if the stage is last,
        else its output hidden state. ``hidden`` is the previous stage's output (for a stage
        that does not start at layer 0); ``caches`` has one cache per layer of the stage.
        ``as_mlx_lm`` runs the model's own forward pass even where a family overrides it."""
        run = functools.partial(DecoderLayout.run, self) if as_mlx_lm else self.run
        if len(layers) == self.num_layers:
            return run(tokens, caches)
        self._handover.hidden = hidden
        try:
            return run(tokens, self._full_cache(caches, layers))
        except _StageDone as done:
            return done.hidden
        finally:
            self._handover.hidden = None

    def _full_cache(self, caches: Sequence[Any], layers: range) -> list[Any]:
        """One cache per layer of the model: this stage's own, and for the others one of the
        same kind (the model may build a mask from any layer's cache; they are never run)."""
        templates, kinds = self.cache_templates(), self._kind_keys()
        mine = dict(zip(layers, caches, strict=True))
        stand_in: dict[tuple[Any, ...], Any] = {}
        for index, cache in mine.items():
            stand_in.setdefault(kinds[index], cache)
        return [mine.get(i, stand_in.get(kinds[i], templates[i])) for i in range(self.num_layers)]

    def cache_templates(self) -> list[Any]:
        """The model's own caches of every layer (mlx-lm's ``make_cache``), made once."""
        if self._templates is None:
            self._templates = self.fresh_model_cache()
        return self._templates

    def _kind_keys(self) -> list[tuple[Any, ...]]:
        """:func:`cache_kind_key` of each template, worked out once, not at every step."""
        if self._kinds is None:
            self._kinds = [cache_kind_key(t) for t in self.cache_templates()]
        return self._kinds

    def trace(self, tokens: mx.array, cache: Sequence[Any] | None = None) -> list[LayerCall]:
        """Build (not evaluate) one forward pass, recording each layer's call."""
        modules = self.layer_modules
        originals = list(modules)
        calls: list[LayerCall] = []
        for i, layer in enumerate(originals):
            modules[i] = _Recording(layer, i, calls)
        try:
            self.run(tokens, cache if cache is not None else self.fresh_model_cache())
        finally:
            modules[:] = originals
        return calls

    def fresh_model_cache(self) -> list[Any]:
        make = getattr(self.model, "make_cache", None)
        from mlx_lm.models.cache import KVCache

        return make() if make else [KVCache() for _ in range(self.num_layers)]

    def check_split(self, boundaries: Sequence[int]) -> None:
        """Refuse to cut where the hidden state does not flow straight from layer to layer.

        Raises:
            SplitError: naming the boundary and why.
        """
        if len(self.fresh_model_cache()) != self.num_layers:
            raise SplitError(
                f"its {self.num_layers} layers have {len(self.fresh_model_cache())} caches "
                "(layers share caches), so it cannot be cut into stages"
            )
        calls = self.trace(mx.zeros((1, 4), mx.int32))
        order = [c.index for c in calls]
        if order != list(range(self.num_layers)):
            raise SplitError(f"its forward pass calls its layers in the order {order}")
        shared = _shared_containers(calls)
        if shared and boundaries:
            raise SplitError(
                f"its layers pass state to each other through a {shared} given to every "
                "layer, so it cannot be cut into stages"
            )
        for b in boundaries:
            if calls[b].hidden_in is not calls[b - 1].hidden_out:
                raise SplitError(
                    f"between layers {b - 1} and {b} the model changes the hidden state "
                    "outside its layers, so it cannot be cut there"
                )
            if not isinstance(calls[b].hidden_in, mx.array):
                raise SplitError(f"layer {b} takes several arrays as its hidden state")
        self.boundary = {
            b: (tuple(calls[b].hidden_in.shape[2:]), calls[b].hidden_in.dtype) for b in boundaries
        }

    def boundary_shape(self, tokens: mx.array, layer: int) -> tuple[tuple[int, ...], mx.Dtype]:
        """Shape and dtype of the hidden state entering ``layer`` for ``tokens`` (B, L)."""
        tail, dtype = self.boundary[layer]
        return (*tokens.shape[:2], *tail), dtype

    def layer_nbytes(self) -> list[int]:
        """Bytes of each layer's parameters (from shapes: nothing is evaluated); 0 for a
        layer another stage runs."""
        return [sum(p.nbytes for _, p in _parameters(layer)) for layer in self.layer_modules]

    def weight_owner(self, key: str) -> int | str:
        """Which part a weight belongs to: a layer index, or "embed" / "norm" / "head"."""
        prefix = self.layers + "."
        if key.startswith(prefix):
            return int(key[len(prefix) :].split(".", 1)[0])
        for part in ("embed", "norm", "head"):
            path = getattr(self, part)
            if path and key.startswith(path + "."):
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
        """Swap every part this stage does not run for a stand-in, so its weights are never
        read; the split must have passed :meth:`check_split`."""
        modules = self.layer_modules
        if not hasattr(self, "boundary"):
            self.check_split([b for b in (layers.start, layers.stop) if 0 < b < len(modules)])
        for i in range(len(modules)):
            if i in layers:
                continue
            role = "hand_over" if i == layers.start - 1 else "stop" if i == layers.stop else ""
            modules[i] = _Skipped(modules[i], role, self._handover)
        if not first and not (last and self.head is None) and self.embed:
            self._stand_in(self.embed)
        if not last:
            for part in (self.norm, self.head):
                if part:
                    self._stand_in(part)

    def _stand_in(self, path: str) -> None:
        real = self._part(path)
        probe = real(mx.zeros((1, 1), mx.int32)) if _is_embedding(real) else None
        width = probe.shape[-1] if probe is not None else 1
        unused = _Unused(width, probe.dtype if probe is not None else self.hidden_dtype)
        object.__setattr__(unused, "real", real)
        _assign(self.model, path, unused)

    def unused_embedding(self) -> _Unused | None:
        """The stand-in of an embedding this stage was cut without, if it was."""
        part = self._part(self.embed)
        return part if isinstance(part, _Unused) else None

    def restore_embedding(self) -> nn.Module:
        """Put back the real embedding a stage's layers turned out to need; it is returned
        (its weights not yet read)."""
        real = object.__getattribute__(self.unused_embedding(), "real")
        _assign(self.model, cast(str, self.embed), real)
        return cast(nn.Module, real)

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[LayerCall]]:
        """Record every call of the layers this stage runs, while the context lasts."""
        modules = self.layer_modules
        originals = list(modules)
        calls: list[LayerCall] = []
        for i, layer in enumerate(originals):
            if not isinstance(layer, _Skipped):
                modules[i] = _Recording(layer, i, calls)
        try:
            yield calls
        finally:
            modules[:] = originals


def _shared_containers(calls: Sequence[LayerCall]) -> str | None:
    """The type of a mutable container (dict, list) handed to more than one layer, if any."""
    seen: dict[int, int] = {}
    for call in calls:
        values = [*call.args, *(v for k, v in call.kwargs.items() if k != "cache")]
        for value in values:
            shared = isinstance(value, (dict, list)) and not isinstance(value, nn.Module)
            if shared and seen.setdefault(id(value), call.index) != call.index:
                return type(value).__name__
    return None


def cache_kind_key(cache: Any) -> tuple[Any, ...]:
    """What makes two layers' caches interchangeable for building a mask."""
    children = getattr(cache, "caches", None)
    if children is not None:
        return ("list", *(cache_kind_key(c) for c in children))
    return (
        type(cache).__name__,
        getattr(cache, "max_size", None),
        getattr(cache, "chunk_size", None),
        len(cache.cache) if isinstance(getattr(cache, "cache", None), list) else None,
    )
