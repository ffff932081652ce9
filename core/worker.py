"""One loaded model in the engine: its scheduler, its runner, and the step that joins them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from .kv_cache import KVCacheOptions
from .pipeline import PipelineStage
from .plan import StepPlan
from .runner import ModelRunner, check_batchable
from .sampler import sample
from .scheduler import Scheduler
from .sequence import RequestOutput, Sequence


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
    def __init__(
        self,
        model: ServedModel,
        max_batch_size: int,
        prefill_step_size: int,
        kv_options: KVCacheOptions,
        announce: Callable[[StepPlan], None] | None = None,
    ) -> None:
        self.model = model
        self.scheduler = Scheduler(max_batch_size, prefill_step_size)
        self.runner = make_runner(model, kv_options, lockstep=announce is not None)
        self.announce = announce

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
        return self.scheduler.drain()


def make_runner(model: ServedModel, kv_options: KVCacheOptions, lockstep: bool) -> ModelRunner:
    """A runner for ``model`` whose caches come from its family's cache factory."""
    check_batchable(model.make_cache(kv_options))
    return ModelRunner(model.stage, lambda: model.make_cache(kv_options), lockstep)
