"""One loaded model in the engine: its scheduler, its runner, and the step that joins them."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from mlx_lm.models.cache import KVCache

from .block_manager import BlockManager
from .disk_tier import DiskTier
from .kv_cache import KVCacheOptions, budget_tokens, bytes_per_token
from .pipeline import PipelineStage
from .plan import StepPlan
from .runner import ModelRunner, check_batchable
from .sampler import sample
from .scheduler import Scheduler
from .sequence import RequestOutput, Sequence

if TYPE_CHECKING:
    from .engine import EngineSettings

log = logging.getLogger(__name__)


class ServedModel(Protocol):
    """What the engine needs of a loaded model (the registry's LoadedModel is one)."""

    name: str
    stage: PipelineStage
    tokenizer: Any
    random_weights: bool

    @property
    def context_length(self) -> int: ...

    def make_cache(self, options: KVCacheOptions) -> list[Any]: ...


class ModelWorker:
    """One loaded model: its scheduler and runner, its KV budget and prefix cache."""

    def __init__(
        self,
        model: ServedModel,
        settings: EngineSettings,
        announce: Callable[[StepPlan], None] | None = None,
        can_measure: bool = True,
        can_use_disk: bool = True,
    ) -> None:
        self.model = model
        self.settings = settings
        self.announce = announce
        self.runner = make_runner(model, settings, lockstep=announce is not None)
        self.capacity_tokens = self._capacity(can_measure)
        self.prefix_caching = settings.prefix_cache and shares_blocks(
            model.make_cache(settings.kv_options)
        )
        if settings.prefix_cache and not self.prefix_caching:
            log.warning(
                "%s: its KV caches cannot share blocks (sliding window or quantized); "
                "prefix caching is off for it",
                model.name,
            )
        self.key = getattr(model, "fingerprint", model.name)
        if settings.disk_dir and self.prefix_caching:
            if can_use_disk:
                self.runner.disk = DiskTier(
                    Path(settings.disk_dir),
                    self.key,
                    model.stage.layers,
                    settings.block_size,
                    settings.disk_max_bytes,
                )
                self.runner.write_all_to_disk = settings.disk_write == "all"
            else:
                log.warning("%s: the KV disk tier is off with several ranks", model.name)
        self.scheduler = self._new_scheduler()

    def _capacity(self, can_measure: bool) -> int:
        s = self.settings
        if s.kv_budget_kind != "tokens" and not can_measure:
            return s.max_batch_size * s.max_sequence_length
        per_token = bytes_per_token(self.model.stage, self.model.make_cache(s.kv_options))
        tokens = budget_tokens(s.kv_budget_kind, s.kv_budget_value, s.reserved_memory_mb, per_token)
        log.info(
            "%s: KV budget %d tokens (%.1f MiB, %d bytes a token)",
            self.model.name,
            tokens,
            tokens * per_token / 2**20,
            per_token,
        )
        return tokens

    def _new_scheduler(self) -> Scheduler:
        s = self.settings
        blocks = BlockManager(self.capacity_tokens // s.block_size, s.block_size)
        salt = self.key if self.prefix_caching else None
        from_disk = self._from_disk if self.runner.disk is not None else None
        return Scheduler(s.max_batch_size, s.prefill_step_size, blocks, salt, from_disk)

    def _from_disk(self, block_hash: str) -> bool:
        if not self.runner.load_from_disk(block_hash):
            return False
        if self.scheduler.blocks.adopt(block_hash):
            return True
        self.runner.blocks.pop(block_hash, None)
        return False

    def step(self) -> list[tuple[Sequence, RequestOutput]]:
        plan = self.scheduler.schedule()
        if self.announce is not None:
            self.announce(plan)
        logits = self.runner.run(plan)
        seqs = [self.scheduler.find(rid) for rid in plan.sample_ids]
        tokens, logprobs = sample(logits, seqs) if seqs else ([], [])
        return self.scheduler.postprocess(plan, tokens, logprobs)

    def fail(self) -> list[Sequence]:
        """Forget every sequence and cache (after an error); the sequences that were here."""
        self.runner.reset()
        seqs = self.scheduler.drain()
        self.scheduler = self._new_scheduler()
        return seqs


def make_runner(model: ServedModel, settings: EngineSettings, lockstep: bool) -> ModelRunner:
    """A runner for ``model`` whose caches come from its family's cache factory."""
    options = settings.kv_options
    check_batchable(model.make_cache(options))
    return ModelRunner(
        model.stage, lambda: model.make_cache(options), lockstep, settings.block_size
    )


def shares_blocks(cache: list[Any]) -> bool:
    """Whether KV blocks of these caches can be copied out and back in (plain caches only)."""
    return all(type(layer_cache) is KVCache for layer_cache in cache)
