"""One loaded model in the engine: its scheduler, its runner, and the step that joins them."""

from __future__ import annotations

from typing import Any, Protocol

from .kv_cache import KVCacheOptions
from .pipeline import PipelineStage
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
    ) -> None:
        self.model = model
        self.scheduler = Scheduler(max_batch_size, prefill_step_size)
        check_batchable(model.make_cache(kv_options))
        self.runner = ModelRunner(model.stage, lambda: model.make_cache(kv_options))

    def step(self) -> list[tuple[Sequence, RequestOutput]]:
        plan = self.scheduler.schedule()
        logits = self.runner.run(plan)
        seqs = [self.scheduler.find(rid) for rid in plan.sample_ids]
        tokens, logprobs = sample(logits, seqs) if seqs else ([], [])
        return self.scheduler.postprocess(plan, tokens, logprobs)

    def fail(self) -> list[Sequence]:
        """Forget every sequence and cache (after an error); the sequences that were here."""
        self.runner.reset()
        return self.scheduler.drain()
