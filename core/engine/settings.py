"""What the engine runs with: scheduling limits, and each model's KV-cache settings."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mlxserve.core.kv.caches import KVCacheOptions

if TYPE_CHECKING:
    from mlxserve.core.config.schema import Config, KVCacheConfig


@dataclass(frozen=True, slots=True)
class KVSettings:
    """One model's KV cache: ``[kv_cache]`` merged with its ``[models.NAME.kv_cache]``."""

    options: KVCacheOptions = KVCacheOptions()
    max_sequence_length: int | None = None  # None: the model's own context
    budget_kind: str = "auto"
    budget_value: int = 0
    reserved_memory_mb: int = 2048
    block_size: int = 16
    prefix_cache: bool = True
    disk_dir: Path | None = None
    disk_max_bytes: int = 10 * 2**30
    disk_write: str = "evicted"

    @classmethod
    def from_config(cls, kv: KVCacheConfig) -> KVSettings:
        return cls(
            options=KVCacheOptions(bits=kv.bits),
            max_sequence_length=kv.max_sequence_length,
            budget_kind=kv.budget.kind,
            budget_value=kv.budget.value,
            reserved_memory_mb=kv.reserved_memory_mb,
            block_size=kv.block_size,
            disk_dir=kv.disk_dir,
            disk_max_bytes=int(kv.disk_max_gb * 2**30),
            disk_write=kv.disk_write,
        )


@dataclass(frozen=True, slots=True)
class SpeculativeSettings:
    """One model's ``[models.NAME.speculative]`` (``draft_model`` by its canonical name)."""

    method: str
    num_draft_tokens: int = 4
    draft_model: str | None = None
    ngram_min: int = 2
    ngram_max: int = 4
    adaptive: bool = True


@dataclass(frozen=True, slots=True)
class EngineSettings:
    max_batch_size: int = 8
    prefill_step_size: int = 512
    queue_size: int = 64
    max_loaded_models: int = 1
    step_timeout_s: float = 30.0
    exit_grace_s: float = 3.0
    disk_flush_s: float = 30.0
    kv: KVSettings = KVSettings()
    kv_by_model: Mapping[str, KVSettings] = field(default_factory=dict)
    speculative_by_model: Mapping[str, SpeculativeSettings] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Config) -> EngineSettings:
        perf = config.performance
        return cls(
            max_batch_size=perf.max_batch_size,
            prefill_step_size=perf.prefill_step_size,
            queue_size=perf.queue_size,
            max_loaded_models=config.registry.max_loaded_models,
            step_timeout_s=config.distributed.step_timeout_s,
            kv=KVSettings.from_config(config.kv_cache),
            kv_by_model={
                name: KVSettings.from_config(config.kv_cache_for(name))
                for name, entry in config.models.items()
                if entry.kv_cache is not None
            },
            speculative_by_model={
                name: SpeculativeSettings(
                    method=spec.method,
                    num_draft_tokens=spec.num_draft_tokens,
                    draft_model=(
                        config.resolve_model(spec.draft_model)[0] if spec.draft_model else None
                    ),
                    ngram_min=spec.ngram_min,
                    ngram_max=spec.ngram_max,
                    adaptive=spec.adaptive,
                )
                for name, entry in config.models.items()
                if (spec := entry.speculative) is not None
            },
        )

    def speculative_for(self, model: str) -> SpeculativeSettings | None:
        return self.speculative_by_model.get(model)

    def kv_for(self, model: str) -> KVSettings:
        """The KV settings of model ``model`` (its canonical name)."""
        return self.kv_by_model.get(model, self.kv)


def sequence_limit(max_sequence_length: int | None, context_length: int) -> int:
    """The longest prompt plus completion of a model: its context, or what is configured
    (which may be longer: the worker warns then, or refuses a model that cannot go past it)."""
    return context_length if max_sequence_length is None else max_sequence_length
