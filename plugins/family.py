"""The ModelFamily contract: everything mlxserve needs to know about one model family."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any, ClassVar

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache

from mlxserve.core.kv.caches import CacheKind, KVCacheOptions, kind_of, servable, warn_unquantizable
from mlxserve.core.model.layout import DecoderLayout
from mlxserve.plugins.gguf_mapping import GGUFModel, decoder_config, decoder_weights
from mlxserve.plugins.reasoning import ReasoningFormat
from mlxserve.plugins.tool_calls import HermesToolCalls, ToolCallFormat


class ModelFamily:
    """Base class of a family plugin's family; subclass it and fill in the class attributes.

    The defaults build mlx-lm's own model classes and suit any decoder laid out the
    mlx-lm way (``model.embed_tokens``, ``model.layers``, ``model.norm``, ``lm_head``).
    Override a method only where the family differs.

    Attributes:
        name: the family's name, as ``[models.NAME] family`` and ``mlxserve plugins list`` show
            it; a non-empty string.
        model_types: the ``model_type`` values of config.json this family claims; a non-empty
            tuple of non-empty strings.
        mlx_lm_modules: model_type -> module under ``mlx_lm.models`` where they differ.
        chat_template: Jinja chat template used when a checkpoint's tokenizer has none.
        bos_token: the token a prompt begins with, or None.
        stop_tokens: tokens that end a turn (a tuple of strings). Generation ends at any of
            them that is in the checkpoint's vocabulary, besides the tokenizer's own eos
            tokens; tiny checkpoints make the first one their eos token.
        control_tokens: other special tokens the chat template writes.
        sampling_defaults: sampling parameters the family recommends, e.g.
            ``{"temperature": 0.6}``; keys among ``sampling.params.DEFAULTABLE_PARAMS``
            (temperature, top_p, top_k, min_p, repetition_penalty, presence_penalty,
            frequency_penalty), values in their valid ranges. A request's value wins, then the
            model's ``[models.NAME]`` entry, then these, then mlxserve's defaults.
        tool_call_format: how the family's models see tools and write tool calls (a
            :class:`~mlxserve.plugins.tool_calls.ToolCallFormat`); None if they cannot call
            tools. The default is Hermes-style ``<tool_call>{...}</tool_call>`` blocks.
        reasoning_format: how the family's thinking models set their reasoning apart from
            the answer (a :class:`~mlxserve.plugins.reasoning.ReasoningFormat`, e.g.
            ``ThinkTags()`` for ``<think>…</think>``); None (the default) if they do not.
        gguf_architectures: the ``general.architecture`` values of GGUF files this family
            converts (empty: none); :meth:`gguf_config` and :meth:`gguf_weights` map them.

    A family whose attributes break these rules is logged and skipped when plugins load.
    """

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    mlx_lm_modules: ClassVar[dict[str, str]] = {}
    chat_template: ClassVar[str]
    bos_token: ClassVar[str | None] = None
    stop_tokens: ClassVar[tuple[str, ...]]
    control_tokens: ClassVar[tuple[str, ...]] = ()
    sampling_defaults: ClassVar[dict[str, float]] = {}
    tool_call_format: ClassVar[ToolCallFormat | None] = HermesToolCalls()
    reasoning_format: ClassVar[ReasoningFormat | None] = None
    gguf_architectures: ClassVar[tuple[str, ...]] = ()

    # ---- building the model ----

    def model_classes(self, config: dict[str, Any]) -> tuple[type[nn.Module], type[Any]]:
        """The (Model, ModelArgs) classes for a checkpoint's config.json."""
        model_type = config["model_type"]
        module_name = self.mlx_lm_modules.get(model_type, model_type)
        module = importlib.import_module(f"mlx_lm.models.{module_name}")
        return module.Model, module.ModelArgs

    # ---- sharding rules ----

    def layout(self, model: nn.Module) -> DecoderLayout:
        """Where the embedding, layers, final norm and head live (pipeline parallelism);
        found in the model by default."""
        return DecoderLayout(model)

    def layer_weights(self, model: nn.Module) -> list[int]:
        """Relative cost of each layer (bytes of its weights), used to split by memory."""
        return self.layout(model).layer_nbytes()

    def supports_tensor_parallel(self, model: nn.Module) -> bool:
        """Whether :meth:`shard_tensors` can split this model's tensors across ranks."""
        return callable(getattr(model, "shard", None))

    def shard_tensors(self, model: nn.Module, group: mx.distributed.Group) -> None:
        """Split each layer's weights across the ranks of ``group`` (tensor parallelism)."""
        if not self.supports_tensor_parallel(model):
            raise NotImplementedError(f"{self.name} has no tensor-parallel rule")
        model.shard(group)

    # ---- KV cache ----

    def cache_templates(self, model: nn.Module) -> list[Any]:
        """The model's own cache of each layer: mlx-lm's ``make_cache``, else full ones."""
        make = getattr(model, "make_cache", None)
        if callable(make):
            return list(make())
        return [KVCache() for _ in model.layers]

    def cache_kinds(self, model: nn.Module) -> list[CacheKind]:
        """The kind of cache each of :meth:`cache_templates` is."""
        return [kind_of(t) for t in self.cache_templates(model)]

    def sliding_window(self, model: nn.Module) -> int | None:
        """The window of the family's sliding-window layers, if it has any."""
        windows = [t.max_size for t in self.cache_templates(model) if kind_of(t) == "sliding"]
        return windows[0] if windows else None

    def make_cache(
        self, model: nn.Module, options: KVCacheOptions, layers: Sequence[int]
    ) -> list[Any]:
        """One fresh cache per layer in ``layers`` (the layers this rank runs); every cache
        when the model has fewer caches than layers (layers that share one) and the rank
        runs them all."""
        templates, kinds = self.cache_templates(model), self.cache_kinds(model)
        if len(templates) != len(model.layers) and len(layers) == len(model.layers):
            layers = range(len(templates))
        warn_unquantizable([kinds[i] for i in layers], options, self.name)
        return [servable(templates[i], kinds[i], options) for i in layers]

    # ---- GGUF files ----

    def gguf_config(self, gguf: GGUFModel) -> dict[str, Any]:
        """config.json of a GGUF file of one of ``gguf_architectures``, from its metadata.

        The default reads llama.cpp's Llama-like keys (``{arch}.block_count``, ...) and takes
        the architecture as ``model_type`` when the family claims it, else its first one.
        """
        arch = gguf.architecture
        model_type = arch if arch in self.model_types else self.model_types[0]
        return {"model_type": model_type, **decoder_config(gguf)}

    def gguf_weights(self, gguf: GGUFModel, config: dict[str, Any]) -> dict[str, mx.array]:
        """The file's tensors under the names this family's model classes load.

        The default renames llama.cpp's Llama-like tensors (``blk.N.attn_q`` ->
        ``model.layers.N.self_attn.q_proj``, ...); any other tensor is an error.
        """
        return decoder_weights(gguf, self.name)

    # ---- tiny checkpoints ----

    def tiny_config(self, model_type: str) -> dict[str, Any]:
        """config.json of a tiny random-weight checkpoint (no vocab_size: the writer sets it)."""
        raise NotImplementedError(f"{self.name} does not describe a tiny checkpoint")

    def __repr__(self) -> str:
        return f"<family {self.name}: {', '.join(self.model_types)}>"
