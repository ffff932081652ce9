"""One loaded model in the engine: its scheduler, its runner, and the step that joins them."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import mlx.core as mx
from mlx_lm.models.cache import (
    ArraysCache,
    CacheList,
    KVCache,
    QuantizedKVCache,
    RotatingKVCache,
)

from mlxserve.core.engine.plan import StepPlan
from mlxserve.core.engine.runner import ModelRunner, sample_rows
from mlxserve.core.engine.scheduler import Scheduler
from mlxserve.core.engine.sequence import RequestOutput, Sequence
from mlxserve.core.engine.settings import sequence_limit
from mlxserve.core.errors import UnsupportedModelError
from mlxserve.core.kv.batching import unbatchable
from mlxserve.core.kv.blocks import BlockManager
from mlxserve.core.kv.caches import KVCacheOptions, budget_tokens, cache_sizes, kind_of
from mlxserve.core.kv.chunked import ChunkedCache
from mlxserve.core.kv.disk_tier import DiskTier
from mlxserve.core.kv.prefix_store import kv_parts, state_parts
from mlxserve.core.model.stages import PipelineStage
from mlxserve.core.sampling.constraint import join_masks, start_masks
from mlxserve.core.sampling.prompt_logprobs import score_chunk
from mlxserve.core.sampling.sampler import sample_each
from mlxserve.core.speculative.setup import make_speculator
from mlxserve.core.speculative.verify import verify

if TYPE_CHECKING:
    from mlxserve.core.engine.settings import EngineSettings

log = logging.getLogger(__name__)
# Copies of recurrent state kept for the prefix cache, per batch slot (their memory is set
# aside from the KV budget like a running sequence's state).
SNAPSHOTS_PER_BATCH_SLOT = 2


class ModelShare(Protocol):
    """How a model is split among the ranks (the registry's Placement is one)."""

    @property
    def strategy(self) -> str: ...

    @property
    def stages(self) -> tuple[Any, ...]: ...  # one per rank, each with to_json()

    def describe(self) -> str: ...


class ServedModel(Protocol):
    """What the engine and the server use of a loaded model (the registry's LoadedModel is
    one): everything either reads of a model is declared here.

    ``family``, ``tool_call_format`` and ``reasoning_format`` are a plugin's ModelFamily,
    ToolCallFormat and ReasoningFormat; they are typed loosely because core imports no other room.
    """

    name: str  # the canonical name, as [models.NAME]
    stage: PipelineStage  # this rank's layers
    tokenizer: Any  # mlx-lm's TokenizerWrapper
    random_weights: bool  # a tiny checkpoint with random weights (for trying things out)
    family: Any  # its ModelFamily: named in errors, renders tool turns

    @property
    def placement(self) -> ModelShare | None:
        """Its share among the ranks (None: loaded as one given stage)."""
        ...

    @property
    def fingerprint(self) -> str:
        """Names this exact checkpoint: KV blocks are shared (and kept on disk) under it."""
        ...

    @property
    def vocab_size(self) -> int:
        """The width of the logits: token ids a request names must be below it."""
        ...

    @property
    def context_length(self) -> int:
        """The longest sequence the model was trained for."""
        ...

    @property
    def sampling_defaults(self) -> Mapping[str, float]:
        """Sampling parameters its family recommends (below a request's and its entry's)."""
        ...

    @property
    def tool_call_format(self) -> Any:
        """How it sees tools and writes tool calls (a ToolCallFormat), or None if it cannot."""
        ...

    @property
    def reasoning_format(self) -> Any:
        """How it sets its reasoning apart from its answer (a ReasoningFormat), or None."""
        ...

    @property
    def eos_token_ids(self) -> frozenset[int]: ...

    @property
    def hidden_special_tokens(self) -> frozenset[int] | None: ...

    def make_cache(self, options: KVCacheOptions) -> list[Any]: ...


class ModelWorker:
    """One loaded model: its scheduler and runner, its KV budget and prefix cache.

    On a pipeline of N stages the running sequences are split into N lanes (micro-batches)
    and up to N steps are in flight: rank 0 announces a lane's next step as soon as that
    lane's tokens are sampled, so while it runs its own stage of one lane, the other ranks
    run theirs on the others. With one lane this is a plain step: plan, run, sample.
    """

    def __init__(
        self,
        model: ServedModel,
        settings: EngineSettings,
        announce: Callable[[StepPlan], None] | None = None,
        can_measure: bool = True,
        can_use_disk: bool = True,
        lanes: int = 1,
        draft: ServedModel | None = None,
    ) -> None:
        """``draft`` is the draft model of a model that speculates by method "draft"."""
        self.model = model
        self.settings = settings
        self.kv = kv = settings.kv_for(model.name)
        self.announce = announce
        self.lanes = lanes
        self.in_flight: deque[StepPlan] = deque()
        self._next_lane = 0
        self.steps = self.overlapped_steps = 0
        self.runner = make_runner(model, settings, lockstep=announce is not None)
        sample = model.make_cache(kv.options)
        unshared = unshareable_kinds(sample)
        self.prefix_caching = kv.prefix_cache and not unshared
        # A model with recurrent or sliding layers reuses blocks up to copies of their state.
        recurrent = self.prefix_caching and bool(state_parts(sample))
        self.snapshot_slots = SNAPSHOTS_PER_BATCH_SLOT * settings.max_batch_size if recurrent else 0
        self._check_context()
        self.speculator = make_speculator(model, settings, self.runner, sample, lanes, draft)
        # Whole blocks only: a sequence is admitted only if all of its blocks can be.
        self.capacity_tokens = self._capacity(can_measure) // kv.block_size * kv.block_size
        if kv.prefix_cache and unshared:
            log.warning(
                "%s: its %s caches cannot share blocks; prefix caching is off for it "
                "(mlxserve_prefix_cache_enabled 0)",
                model.name,
                " and ".join(unshared),
            )
        self.key = model.fingerprint
        if kv.disk_dir and self.prefix_caching:
            if self.snapshot_slots:
                log.warning(
                    "%s: the KV disk tier keeps no recurrent state or sliding windows; it is off",
                    model.name,
                )
            elif can_use_disk:
                store = self.runner.prefix_store
                store.disk = DiskTier(
                    Path(kv.disk_dir),
                    self.key,
                    model.stage.layers,
                    kv.block_size,
                    kv.disk_max_bytes,
                    parts=len(kv_parts(sample)),
                )
                store.write_all_to_disk = kv.disk_write == "all"
            else:
                log.warning("%s: the KV disk tier is off with several ranks", model.name)
        self.scheduler = self._new_scheduler()

    def _check_context(self) -> None:
        """A configured context past the model's own is served with a warning, unless the
        model's positions are a learned table that ends there."""
        configured, trained = self.kv.max_sequence_length, self.model.context_length
        if configured is None or configured <= trained:
            return
        table = self.model.stage.layout.learned_positions()
        if table is not None:
            raise UnsupportedModelError(
                f"{self.model.name}: max_sequence_length {configured} is past the {trained} "
                f"positions of its learned position table ({table}); set it to {trained} or less"
            )
        log.warning(
            "%s: max_sequence_length %d is past the %d tokens it was trained for; its "
            "answers may be poor past %d",
            self.model.name,
            configured,
            trained,
            trained,
        )

    def _capacity(self, can_measure: bool) -> int:
        kv = self.kv
        batch = self.settings.max_batch_size if self.runner.batchable else 1
        longest = sequence_limit(kv.max_sequence_length, self.model.context_length)
        if kv.budget_kind != "tokens" and not can_measure:
            return batch * longest
        per_token, fixed, windows = self._measure_caches()
        drafting = self.speculator.proposer.kv_bytes_per_token() if self.speculator else 0
        per_token += drafting  # a draft model's caches grow with the same tokens
        # Recurrent state takes the same bytes whatever a sequence's length: a full batch's
        # worth, and the copies (with their sliding windows) the prefix cache keeps, are set
        # aside before the budget is counted in tokens.
        aside = batch * fixed + self.snapshot_slots * (fixed + windows)
        reserved_mb = kv.reserved_memory_mb + -(-aside // 2**20)
        tokens = budget_tokens(kv.budget_kind, kv.budget_value, reserved_mb, per_token)
        if kv.budget_kind == "bytes":
            tokens = max(0, kv.budget_value - aside) // per_token
        log.info(
            "%s: KV budget %d tokens (%.1f MiB, %d bytes a token%s%s)",
            self.model.name,
            tokens,
            tokens * per_token / 2**20,
            per_token,
            f", {drafting} of them the draft model's" if drafting else "",
            f"; {aside / 2**20:.1f} MiB set aside for state" if aside else "",
        )
        if tokens < longest:
            log.warning(
                "%s: its KV budget holds %d tokens, fewer than its context of %d: no request "
                "may be longer (set [kv_cache] budget or max_sequence_length)",
                self.model.name,
                tokens,
                longest,
            )
        return tokens

    def _measure_caches(self) -> tuple[int, int, int]:
        """:func:`cache_sizes` of the model's caches; a model whose forward pass fails with
        the quantized caches asked for is refused, naming the setting."""
        options = self.kv.options
        try:
            return cache_sizes(self.model.stage, self.model.make_cache(options))
        except UnsupportedModelError:
            raise
        except Exception as exc:
            if options.bits is None:
                raise
            raise UnsupportedModelError(
                f"{self.model.name}: [kv_cache] bits = {options.bits} does not work with this "
                f"model ({type(exc).__name__}: {exc}); leave bits unset for it"
            ) from exc

    def _new_scheduler(self) -> Scheduler:
        s, block_size = self.settings, self.kv.block_size
        blocks = BlockManager(self.capacity_tokens // block_size, block_size)
        salt = self.key if self.prefix_caching else None
        from_disk = self._from_disk if self.runner.prefix_store.disk is not None else None
        batch = s.max_batch_size if self.runner.batchable else 1
        return Scheduler(
            batch, s.prefill_step_size, blocks, salt, from_disk, self.lanes, self.snapshot_slots
        )

    def _from_disk(self, block_hash: str, keep: Collection[str]) -> bool:
        store = self.runner.prefix_store
        if not store.load_from_disk(block_hash):
            return False
        blocks = self.scheduler.blocks
        assert blocks is not None  # a worker's schedulers always have a block manager
        if blocks.adopt(block_hash, keep):
            return True
        store.discard(block_hash)
        return False

    def has_work(self) -> bool:
        return bool(self.in_flight) or self.scheduler.has_work()

    def step(self) -> list[tuple[Sequence, RequestOutput]]:
        """Announce the next step of every lane that has none in flight; finish the oldest."""
        while len(self.in_flight) < self.lanes:
            lane = self._ready_lane()
            if lane is None:
                break
            if self.speculator is not None:
                running = self.scheduler.running
                self.speculator.draft_or_pause([s for s in running if s.lane == lane], running)
            plan = self.scheduler.schedule(lane)
            if self.announce is not None:
                self.announce(plan)
            self.in_flight.append(plan)
        return self.finish_oldest() if self.in_flight else []

    def settle(self) -> list[tuple[Sequence, RequestOutput]]:
        """Finish every step in flight, announcing none (before the ranks do anything else)."""
        results = []
        while self.in_flight:
            results += self.finish_oldest()
        return results

    def finish_oldest(self) -> list[tuple[Sequence, RequestOutput]]:
        plan = self.in_flight.popleft()
        self.steps += 1
        self.overlapped_steps += bool(self.in_flight)
        found = [self.scheduler.find(rid) for rid in plan.sample_ids]
        alive = [i for i, seq in enumerate(found) if seq is not None]  # none aborted meanwhile
        seqs = [seq for seq in found if seq is not None]
        pending = start_masks([s.constraint for s in seqs])  # computed during the forward pass
        scoring = self._scoring(plan)
        try:
            logits, every_position = self.runner.run(plan, scoring)
        finally:
            masks = join_masks(pending)
        failed = self._score_prompts(plan, scoring, every_position)
        if not seqs:
            return self._fail_scoring(self.scheduler.postprocess(plan, [], [], []), failed)
        assert logits is not None, "a step that samples has logits"
        if plan.decode_drafts:
            return self._fail_scoring(
                self._verify(plan, logits, alive, seqs, masks, failed), failed
            )
        if len(alive) < len(found):
            logits = logits[mx.array(alive, dtype=mx.int32)]
        tokens, logprobs = sample_each(logits, seqs, masks)
        tokens = [failed.pop(s.request_id, t) for s, t in zip(seqs, tokens, strict=True)]
        results = self.scheduler.postprocess(plan, seqs, tokens, logprobs)
        return self._fail_scoring(results, failed)

    def _verify(
        self,
        plan: StepPlan,
        logits: mx.array,
        alive: list[int],
        seqs: list[Sequence],
        masks: Any,
        failed: dict[str, Exception],
    ) -> list[tuple[Sequence, RequestOutput]]:
        """A step that verified drafted tokens: each sequence's accepted tokens, and the
        rewinds its caches need before the next step."""
        assert self.speculator is not None  # only a speculating worker drafts
        scheduler, width = self.scheduler, plan.draft_width
        decoding = len(plan.decode_ids)
        drafts = [plan.decode_drafts[i] if i < decoding else () for i in alive]
        scheduler.prefilled(plan)

        def advance(seq: Sequence, token: int | Exception, logprob: Any) -> RequestOutput:
            return scheduler.advance_or_fail(seq, failed.pop(seq.request_id, token), logprob)

        rows, before = sample_rows(plan), [s.accepted for s in seqs]
        outputs = verify(logits, [rows[i] for i in alive], seqs, drafts, masks, advance)
        for i, seq, draft, output, earlier in zip(
            alive, seqs, drafts, outputs, before, strict=True
        ):
            if i < decoding:
                scheduler.rewound(seq, min(width, 1 + width - len(output.token_ids)))
                self.speculator.verified(len(draft), seq.accepted - earlier)
        return list(zip(seqs, outputs, strict=True))

    def _scoring(self, plan: StepPlan) -> dict[str, Sequence]:
        """The sequences of ``plan``'s prefill chunks that score their prompt."""
        scoring = {s.request_id: s for s in self.scheduler.prefilling if s.scores_prompt}
        if not scoring:  # the common step: nothing to look up
            return {}
        chunks = {c.request_id for group in plan.prefill for c in group}
        return {request_id: s for request_id, s in scoring.items() if request_id in chunks}

    def _score_prompts(
        self, plan: StepPlan, scoring: dict[str, Sequence], every_position: dict[str, mx.array]
    ) -> dict[str, Exception]:
        """Add each scored chunk's log probabilities to its sequence; the errors, by request
        id (an error ends its own request alone)."""
        failed: dict[str, Exception] = {}
        for chunk in (c for group in plan.prefill for c in group if c.request_id in scoring):
            seq = scoring[chunk.request_id]
            end = chunk.start + len(chunk.tokens)
            try:
                logits = every_position[chunk.request_id]
                targets = seq.prompt_ids[chunk.start + 1 : end + 1]
                top_n = seq.params.prompt_logprobs or 0
                seq.prompt_logprobs += score_chunk(logits, targets, top_n)
            except Exception as exc:
                failed[chunk.request_id] = exc
        return failed

    def _fail_scoring(
        self, results: list[tuple[Sequence, RequestOutput]], failed: dict[str, Exception]
    ) -> list[tuple[Sequence, RequestOutput]]:
        """``results``, and the last output of each sequence whose prompt could not be
        scored in a step that did not sample it."""
        for request_id, exc in failed.items():
            seq = self.scheduler.find(request_id)
            if seq is not None:
                results.append((seq, self.scheduler.fail(seq, exc)))
        return results

    def _ready_lane(self) -> int | None:
        """The next lane, in turn, with work and no step in flight."""
        busy = {plan.lane for plan in self.in_flight}
        for offset in range(self.lanes):
            lane = (self._next_lane + offset) % self.lanes
            if lane not in busy and self.scheduler.has_work(lane):
                self._next_lane = (lane + 1) % self.lanes
                return lane
        return None

    def close(self, timeout_s: float) -> None:
        """Keep the prefix cache for a restart: every cached block goes to the disk tier."""
        self.settle()
        while any(self.scheduler.to_save) or any(self.scheduler.to_release):
            self.step()  # copies the blocks of sequences that just ended out of the batch
            self.settle()
        store = self.runner.prefix_store
        if store.disk is None:
            return
        queued = store.spill_to_disk()
        if store.disk.close(timeout_s):
            log.info("%s: %d KV blocks kept on the disk tier", self.model.name, queued)
        else:
            log.warning(
                "%s: the disk tier did not finish writing within %g s", self.model.name, timeout_s
            )

    def fail(self) -> list[Sequence]:
        """Forget every sequence and cache (after an error); the sequences that were here."""
        self.in_flight.clear()
        self.runner.reset()
        seqs = self.scheduler.drain()
        self.scheduler = self._new_scheduler()
        return seqs


def make_runner(model: ServedModel, settings: EngineSettings, lockstep: bool) -> ModelRunner:
    """A runner for ``model`` whose caches come from its family's cache factory."""
    kv = settings.kv_for(model.name)
    alone = unbatchable(model.make_cache(kv.options))
    if alone:
        log.warning(
            "%s: its %s caches cannot be batched; it runs one sequence at a time",
            model.name,
            " and ".join(alone),
        )
    return ModelRunner(
        model.stage, lambda: model.make_cache(kv.options), lockstep, kv.block_size, not alone
    )


def unshareable_kinds(cache: Collection[Any]) -> list[str]:
    """The kinds among these caches that cannot join the prefix cache: none if the model can.

    Plain caches (full, latent, and chunked ones, which keep every key) are kept block by
    block, composite ones by their parts, recurrent state and sliding windows as copies at
    chosen blocks; quantized or a model's own caches have no blocks to copy.
    """
    kinds: set[str] = set()
    for c in cache:
        if isinstance(c, CacheList):
            kinds.update(unshareable_kinds(c.caches))
        elif isinstance(c, QuantizedKVCache):
            kinds.add("quantized")
        elif type(c) not in (KVCache, ChunkedCache, ArraysCache, RotatingKVCache):
            kinds.add(kind_of(c))
    return sorted(kinds)
