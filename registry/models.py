"""The model registry: names and aliases from ``[models]`` to checkpoints, families and models."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx

from mlxserve.core.distributed.cluster import Cluster
from mlxserve.core.errors import ModelNotFoundError, UnsupportedModelError
from mlxserve.core.kv.batching import unbatchable
from mlxserve.core.kv.caches import KVCacheOptions
from mlxserve.core.model.dtype import settle_compute_dtype
from mlxserve.core.model.exactness import check_stage, settle_embedding
from mlxserve.core.model.loader import build_lazy, build_skeleton, materialize
from mlxserve.core.model.stages import PipelineStage
from mlxserve.plugins.family import ModelFamily
from mlxserve.plugins.reasoning import ReasoningFormat
from mlxserve.plugins.tiny import is_tiny_checkpoint
from mlxserve.plugins.tool_calls import ToolCallFormat, marker_token_ids
from mlxserve.registry.fingerprint import WEIGHT_HASHES_FILE, checkpoint_fingerprint
from mlxserve.registry.packaged import recommended_sampling
from mlxserve.registry.placement import Placement, plan_placement
from mlxserve.registry.plugins import Plugins
from mlxserve.registry.store import ModelStore

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from mlxserve.core.config.schema import Config, ModelEntry


@dataclass
class LoadedModel:
    """A model ready to run: its stage of layers, tokenizer and family."""

    name: str
    family: ModelFamily
    stage: PipelineStage
    config: dict[str, Any]
    path: Path
    tokenizer: Any
    plugins: Plugins
    random_weights: bool
    placement: Placement | None = None
    weight_hashes: Path | None = None
    recommended: Mapping[str, float] = dataclasses.field(default_factory=dict)

    @functools.cached_property
    def fingerprint(self) -> str:
        """Names this exact checkpoint (name, config, weight contents): KV blocks of another
        checkpoint, or of other weights in the same files, never match."""
        return checkpoint_fingerprint(self.name, self.path, self.weight_hashes)

    @functools.cached_property
    def tool_call_format(self) -> ToolCallFormat | None:
        """How this model writes tool calls (its family's format, or a plugin's override)."""
        return self.plugins.hook.mlxserve_tool_call_format(family=self.family)

    @functools.cached_property
    def reasoning_format(self) -> ReasoningFormat | None:
        """How this model sets its reasoning apart (its family's format, or a plugin's)."""
        return self.plugins.hook.mlxserve_reasoning_format(family=self.family)

    @functools.cached_property
    def hidden_special_tokens(self) -> frozenset[int] | None:
        """The special tokens left out of generated text: all (None), or all but the tool-call
        and reasoning markers when they are special tokens of this checkpoint (the parsers
        need them)."""
        fmt, reasoning = self.tool_call_format, self.reasoning_format
        markers = set(marker_token_ids(fmt, self.tokenizer).values()) if fmt else set()
        if reasoning is not None:
            added = self.tokenizer._tokenizer.get_added_vocab()
            markers.update(added[m] for m in reasoning.markers if m in added)
        if not markers:
            return None
        decoder = self.tokenizer._tokenizer.added_tokens_decoder
        return frozenset(i for i, token in decoder.items() if token.special and i not in markers)

    @property
    def context_length(self) -> int:
        """The longest sequence the model was trained for (its max_position_embeddings)."""
        text = self.config.get("text_config") or {}
        longest = self.config.get("max_position_embeddings") or text.get("max_position_embeddings")
        return int(longest or 2**31)

    @property
    def vocab_size(self) -> int:
        """The width of the logits (the model's vocab_size, which may exceed the tokenizer's)."""
        return self.stage.layout.vocab_size

    @property
    def sampling_defaults(self) -> Mapping[str, float]:
        """The sampling parameters recommended for this model: its own (a packaged model's),
        over its family's."""
        return {**self.family.sampling_defaults, **self.recommended}

    @functools.cached_property
    def eos_token_ids(self) -> frozenset[int]:
        """Tokens that end generation: the tokenizer's eos ids, and those of the family's
        ``stop_tokens`` that are in the tokenizer's vocabulary."""
        ids = set(getattr(self.tokenizer, "eos_token_ids", ()) or ())
        vocab = self.tokenizer.get_vocab()
        ids.update(vocab[token] for token in self.family.stop_tokens if token in vocab)
        return frozenset(ids)

    def make_cache(self, options: KVCacheOptions) -> list[Any]:
        """Fresh KV caches for the layers of this stage, from the family's cache factory."""
        return self.plugins.hook.mlxserve_kv_cache_factory(
            family=self.family,
            model=self.stage.layout.model,
            options=options,
            layers=list(self.stage.layers),
        )


class ModelRegistry:
    """Resolves model names and aliases, and loads their checkpoints with their family."""

    def __init__(self, config: Config, plugins: Plugins, cluster: Cluster | None = None) -> None:
        self.config = config
        self.plugins = plugins
        self.cluster = cluster or Cluster()
        self.store = ModelStore(config.registry.cache_dir, plugins)

    def checkpoint(self, name: str, *, download: bool = False) -> Path:
        """The folder of a model's checkpoint (written or downloaded as needed)."""
        _, entry = self.config.resolve_model(name)
        return self.store.locate(
            entry.source, revision=entry.revision, download=download, family=entry.family
        )

    def family_of(self, name: str, path: Path) -> ModelFamily:
        """The family of a model: its entry's ``family``, else its config.json's model_type."""
        _, entry = self.config.resolve_model(name)
        if entry.family:
            return self.plugins.family(entry.family)
        return self.plugins.family_for(read_model_config(path)["model_type"])

    def load(
        self,
        name: str,
        *,
        layers: range | None = None,
        first: bool = True,
        last: bool = True,
        download: bool = False,
    ) -> LoadedModel:
        """Load a model: this rank's share of it, or the given stage of it.

        Only the weights of the layers this rank (or stage) runs are read into memory. On
        several ranks every rank must call this at the same time (they agree on the split).
        """
        canonical, entry = self.config.resolve_model(name)
        hook = self.plugins.hook
        placement = None
        if layers is None and self._downloads_own_layers_only(entry.source_kind):
            path, family, placement = self._download_own_layers(canonical, entry, download)
        else:
            path = self.checkpoint(canonical, download=download)
            family = self.family_of(canonical, path)
        partial = placement is not None  # this rank fetched only its own layers' files
        model, config = build_lazy(path, family.model_classes, partial=partial)
        layout = hook.mlxserve_sharding_rule(family=family, model=model)
        if layers is not None:
            self._settle_dtype(canonical, layout, layers, first=first, last=last)
            stage = materialize(layout, layers=layers, first=first, last=last)
        else:
            placement = placement or plan_placement(
                family, model, self.cluster, self.config.distributed
            )
            self._settle_dtype(canonical, layout, *self._share(placement, layout))
            stage = self._materialize_share(family, layout, placement)
        tokenizer = load_tokenizer_of(path, config.get("eos_token_id"))
        template = hook.mlxserve_chat_template(family=family, tokenizer=tokenizer._tokenizer)
        if template:
            tokenizer._tokenizer.chat_template = template
        loaded = LoadedModel(
            canonical,
            family,
            stage,
            config,
            path,
            tokenizer,
            self.plugins,
            random_weights=is_tiny_checkpoint(path),
            placement=placement,
            weight_hashes=Path(self.config.registry.cache_dir) / WEIGHT_HASHES_FILE,
            recommended=recommended_sampling(entry.source),
        )
        caches = functools.partial(loaded.make_cache, KVCacheOptions())
        if settle_embedding(stage, caches) and partial:
            raise UnsupportedModelError(
                f"{canonical}: the layers of rank {self.cluster.rank} use the embeddings, "
                "which this rank did not download (it fetched only its own layers' files); "
                'serve it with [distributed] strategy = "tensor" or from a local copy'
            )
        if entry.check_exactness:
            check_stage(
                stage,
                lambda: loaded.make_cache(KVCacheOptions()),
                model_type=str(config.get("model_type")),
                batchable=not unbatchable(loaded.make_cache(KVCacheOptions())),
            )
        mx.clear_cache()  # what the load and the probe freed goes back to the system
        return loaded

    def _downloads_own_layers_only(self, source_kind: str) -> bool:
        return (
            self.cluster.distributed
            and source_kind == "hub"
            and self.config.distributed.strategy != "tensor"
        )

    def _download_own_layers(
        self, name: str, entry: ModelEntry, download: bool
    ) -> tuple[Path, ModelFamily, Placement]:
        """Plan this rank's share from the checkpoint's config and weight index, then fetch
        only the safetensors files that hold its layers."""
        fetch = functools.partial(
            self.store.hub, entry.source, revision=entry.revision, download=download
        )
        path = fetch(weight_files=[])
        family = self.family_of(name, path)
        index = path / "model.safetensors.index.json"
        if not index.is_file():  # one weights file: every rank needs it
            path = fetch()
            model, _ = build_lazy(path, family.model_classes)
            return (
                path,
                family,
                plan_placement(family, model, self.cluster, self.config.distributed),
            )
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        skeleton = build_skeleton(path, family.model_classes, weight_map)
        layout = self.plugins.hook.mlxserve_sharding_rule(family=family, model=skeleton)
        placement = plan_placement(family, skeleton, self.cluster, self.config.distributed)
        rank, size = self.cluster.rank, self.cluster.size
        mine = placement.for_rank(rank).layers
        files = sorted(
            {
                file
                for key, file in weight_map.items()
                if layout.weight_needed(key, mine, first=rank == size - 1, last=rank == 0)
            }
        )
        return fetch(weight_files=files), family, placement

    def _share(self, placement: Placement, layout: Any) -> tuple[range, bool, bool, int]:
        """This rank's layers, (first, last), and how many ranks split each weight."""
        if placement.strategy != "pipeline":
            ways = self.cluster.size if placement.strategy == "tensor" else 1
            return range(layout.num_layers), True, True, ways
        rank = self.cluster.rank
        return (placement.for_rank(rank).layers, *placement.role(rank), 1)

    def _settle_dtype(
        self, name: str, layout: Any, layers: range, first: bool, last: bool, ways: int = 1
    ) -> None:
        # Before tensor sharding and before keep_only: both then act on the converted layers,
        # and materialize reads (and converts) one layer at a time.
        settle_compute_dtype(
            name,
            layout,
            self.config.performance.compute_dtype,
            needed=lambda key: layout.weight_needed(key, layers, first=first, last=last),
            ways=ways,
            reserved_bytes=self.config.kv_cache_for(name).reserved_memory_mb * 2**20,
            cluster=self.cluster,
        )

    def _materialize_share(
        self, family: ModelFamily, layout: Any, placement: Placement
    ) -> PipelineStage:
        cluster = self.cluster
        if placement.strategy == "tensor":
            family.shard_tensors(layout.model, cluster.group)
        if placement.strategy != "pipeline":
            return materialize(layout)
        rank = cluster.rank
        first, last = placement.role(rank)
        return materialize(
            layout,
            layers=placement.for_rank(rank).layers,
            first=first,
            last=last,
            group=cluster.group,
            prev_rank=None if first else rank + 1,
            next_rank=None if last else rank - 1,
        )


def load_tokenizer_of(path: Path, eos_token_ids: Any) -> Any:
    """mlx-lm's tokenizer wrapper of a checkpoint, even of a model type transformers does not
    know (its AutoTokenizer reads config.json, and fails on one it cannot parse)."""
    from mlx_lm.utils import load_tokenizer
    from transformers import PretrainedConfig

    try:
        tokenizer = load_tokenizer(path, eos_token_ids=eos_token_ids)
    except (ValueError, KeyError, AttributeError) as exc:
        log.info(
            "%s: transformers cannot read its config.json (%s); tokenizer files only", path, exc
        )
        extra = {"config": PretrainedConfig()}
        tokenizer = load_tokenizer(path, tokenizer_config_extra=extra, eos_token_ids=eos_token_ids)
    # The engine bounds a sequence by the model's context (or the one configured): a longer
    # prompt is never "indexing errors", so transformers' warning about it is noise.
    tokenizer._tokenizer.model_max_length = 2**62
    return tokenizer


def read_model_config(path: Path) -> dict[str, Any]:
    """A checkpoint's config.json."""
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"{path}: cannot read config.json ({exc})") from exc
