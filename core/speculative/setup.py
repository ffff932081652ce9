"""A model's speculator, from its ``[models.NAME.speculative]``: checked, or refused with why."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import mlx.core as mx

from mlxserve.core.kv.rewind import unrewindable
from mlxserve.core.speculative.draft_model import DraftModelProposer, draft_proposer
from mlxserve.core.speculative.policy import StepCost
from mlxserve.core.speculative.speculator import NgramProposer, Proposer, Speculator

if TYPE_CHECKING:
    from mlxserve.core.engine.runner import ModelRunner
    from mlxserve.core.engine.settings import EngineSettings, SpeculativeSettings
    from mlxserve.core.engine.worker import ServedModel

log = logging.getLogger(__name__)
MEASURED_REPEATS = 2


def make_speculator(
    model: ServedModel,
    settings: EngineSettings,
    runner: ModelRunner,
    sample_cache: list[Any],
    lanes: int,
    draft: ServedModel | None = None,
) -> Speculator | None:
    """The speculator ``model`` is configured with (method "draft" drafts with ``draft``, its
    draft model, loaded); None (with a log line saying why) if it has none or cannot speculate
    exactly."""
    spec = settings.speculative_for(model.name)
    if spec is None:
        return None
    kinds = unrewindable(sample_cache)
    why = None
    if kinds:
        why = f"its {' and '.join(kinds)} caches cannot forget rejected drafts"
    elif not runner.batchable:
        why = "its caches cannot be batched, so they cannot forget rejected drafts either"
    proposer: Proposer | None = None
    if why is None:
        proposer, why = _proposer(model, spec, settings, runner, draft)
    if proposer is None:
        log.warning("%s: speculative decoding (%s) is off: %s", model.name, spec.method, why)
        return None
    cost = StepCost() if runner.lockstep else measure(runner, settings, spec.num_draft_tokens)
    drafting = None
    if isinstance(proposer, DraftModelProposer):
        drafting = measure(proposer.runner, settings, 0)
    log.info(
        "%s: speculative decoding by %s, up to %d drafted tokens a step%s",
        model.name,
        spec.method,
        spec.num_draft_tokens,
        ", as many as pay" if spec.adaptive else "",
    )
    return Speculator(spec, proposer, cost, drafting)


def _proposer(
    model: ServedModel,
    spec: SpeculativeSettings,
    settings: EngineSettings,
    runner: ModelRunner,
    draft: ServedModel | None,
) -> tuple[Proposer | None, str | None]:
    if spec.method == "ngram":
        return NgramProposer(spec.ngram_min, spec.ngram_max), None
    if spec.method == "draft":
        if draft is None:
            return None, f"its draft model {spec.draft_model!r} is not loaded (see above)"
        return draft_proposer(model, draft, settings)
    if spec.method == "mtp":
        return None, (
            f"no family loads multi-token-prediction layers yet ({model.family} included; "
            "mlx-lm drops them from the checkpoints it loads)"
        )
    return None, f"method {spec.method!r} is not available for this model"


def measure(runner: ModelRunner, settings: EngineSettings, most: int) -> StepCost:
    """The cost of forward passes of 1, 2, 4, … tokens (up to a full batch drafting ``most``
    each) on this backend: the fastest of a few runs of each, on fresh caches. (Rows of one
    token each cost about what one row of that many tokens does: the same matrix products.)"""
    largest = settings.max_batch_size * (1 + most)
    sizes = [1 << i for i in range(largest.bit_length() + 1) if 1 << i <= 2 * largest]
    points = []
    for n in sizes:
        best = float("inf")
        for _ in range(MEASURED_REPEATS):
            cache, tokens = runner.make_cache(), mx.zeros((1, n), mx.int32)
            start = time.perf_counter()
            mx.eval(runner.stage.forward(tokens, cache))
            best = min(best, time.perf_counter() - start)
        points.append((n, best))
    return StepCost(points)
