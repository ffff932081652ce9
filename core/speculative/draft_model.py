"""Drafting with a smaller model of the same vocabulary: its greedy continuation.

The draft model keeps one decode batch of its own (a second :class:`ModelRunner`, lane 0, no
prefix cache), a row per sequence it drafts for, and what each row's caches hold (``fed``).
At each proposal a row keeps the longest prefix of what it holds that the sequence still
begins with (rejected drafts and padding are rewound) and is fed the rest in one ragged step,
its last position giving the first drafted token; one-token steps give the others. A new
sequence is prefilled, in chunks, its last chunk joining the batch in that ragged step.

Verification samples the target exactly whatever is drafted, so the draft proposes greedily.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING, cast

import mlx.core as mx

from mlxserve.core.engine.plan import PrefillChunk, StepPlan
from mlxserve.core.engine.runner import ModelRunner, sample_rows
from mlxserve.core.engine.sequence import Sequence
from mlxserve.core.kv.batching import unbatchable
from mlxserve.core.kv.caches import KVCacheOptions, cache_sizes
from mlxserve.core.kv.rewind import unrewindable

if TYPE_CHECKING:
    from mlxserve.core.engine.settings import EngineSettings
    from mlxserve.core.engine.worker import ServedModel

log = logging.getLogger(__name__)
# The lane of the runner that prefills a prompt's chunks before its last: it has no rows, so
# its steps decode nothing (the drafting batch is lane 0).
PREFILL_LANE = 1


class DraftModelProposer:
    """Greedy drafts from ``draft``, a model whose tokenizer is the target's."""

    def __init__(
        self,
        draft: ServedModel,
        options: KVCacheOptions,
        prefill_step_size: int,
        vocab_size: int,
    ) -> None:
        self.draft = draft
        self.options = options
        self.prefill_step_size = prefill_step_size
        self.vocab_size = vocab_size  # the target's: a drafted token must be one it knows
        self.runner = ModelRunner(draft.stage, lambda: draft.make_cache(options))
        self.fed: dict[str, list[int]] = {}  # what each row's caches hold, padding included
        self.known: dict[str, int] = {}  # how many of them are surely its sequence's own
        self.to_release: set[str] = set()

    def kv_bytes_per_token(self) -> int:
        return cache_sizes(self.draft.stage, self.draft.make_cache(self.options))[0]

    def forget(self, request_id: str) -> None:
        if request_id in self.fed:
            self.to_release.add(request_id)

    def propose(self, seqs: Seq[Sequence], most: int) -> list[list[int]]:
        if most <= 0:
            return [[] for _ in seqs]
        try:
            return self._propose(seqs, most)
        except ValueError as exc:  # a sliding window that cannot rewind so far: start over
            log.warning("%s: drafting starts over: %s", self.draft.name, exc)
            self._reset()
            return [[] for _ in seqs]
        except BaseException:
            self._reset()  # its caches may be part way through a step: forget them all
            raise

    def _reset(self) -> None:
        self.runner.reset()
        self.fed.clear()
        self.known.clear()
        self.to_release.clear()

    def _propose(self, seqs: Seq[Sequence], most: int) -> list[list[int]]:
        wanted = {s.request_id: [*s.prompt_ids, *s.output_ids] for s in seqs}
        self.to_release = {r for r in self.fed if r not in wanted}  # ended, or drafts no more
        new = [r for r in wanted if r not in self.fed]
        for request_id in new:
            self._prefill_all_but_last_chunk(request_id, wanted[request_id])
        proposals: dict[str, list[int]] = {r: [] for r in wanted}
        for step in range(most):
            for request_id, token in self._feed(wanted, new if step == 0 else []).items():
                proposals[request_id].append(token)
                if step == 0:
                    self.known[request_id] = len(wanted[request_id])
                wanted[request_id].append(token)
        eos = self.draft.eos_token_ids
        return [_until_eos(proposals[s.request_id], eos) for s in seqs]

    def _prefill_all_but_last_chunk(self, request_id: str, tokens: list[int]) -> None:
        size = self.prefill_step_size
        end = (len(tokens) - 1) // size * size  # the last chunk joins the batch in _feed
        for start in range(0, end, size):
            chunk = PrefillChunk(request_id, tuple(tokens[start : start + size]), start, False)
            self.runner.run(StepPlan(lane=PREFILL_LANE, prefill=((chunk,),)))
        self.fed[request_id] = tokens[:end]

    def _feed(self, wanted: dict[str, list[int]], new: list[str]) -> dict[str, int]:
        """One step: every row forgets what it holds past the longest prefix of its ``wanted``
        tokens and is fed the rest (at least the last; a new row, its prompt's last chunk):
        each one's greedy next token."""
        rows = [r for r in self.runner.lane(0).rows if r not in self.to_release]
        rewind, missing = [], []
        for request_id in rows:
            fed, tokens = self.fed[request_id], wanted[request_id]
            common = _common_prefix(fed, tokens, self.known[request_id])
            common = min(common, len(tokens) - 1)
            rewind.append((request_id, len(fed) - common))
            missing.append(tokens[common:])
            del fed[common:]
        chunks = []
        for request_id in new:
            fed = self.fed[request_id]
            chunk = PrefillChunk(request_id, tuple(wanted[request_id][len(fed) :]), len(fed), True)
            chunks.append((chunk,))
            fed += chunk.tokens
        plan = StepPlan(
            release=tuple(self.to_release),
            decode_ids=tuple(rows),
            decode_tokens=tuple(m[0] for m in missing),
            decode_drafts=tuple(tuple(m[1:]) for m in missing),
            prefill=tuple(chunks),
            rewind=tuple((r, n) for r, n in rewind if n),
        )
        for request_id in self.to_release:
            del self.fed[request_id]
            self.known.pop(request_id, None)
        self.to_release = set()
        for request_id, tokens in zip(rows, missing, strict=True):  # and the runner's padding
            self.fed[request_id] += tokens + [tokens[-1]] * (1 + plan.draft_width - len(tokens))
        return self._greedy(plan)

    def _greedy(self, plan: StepPlan) -> dict[str, int]:
        """Run ``plan``: each sampled row's argmax at its last real position."""
        logits, _ = self.runner.run(plan)
        assert logits is not None  # every plan here samples
        last = [first + count - 1 for first, count in sample_rows(plan)]
        tokens = mx.argmax(logits[mx.array(last)][:, : self.vocab_size], axis=-1)
        return dict(zip(plan.sample_ids, cast("list[int]", tokens.tolist()), strict=True))


def _common_prefix(a: list[int], b: list[int], known: int) -> int:
    """How many tokens ``a`` and ``b`` begin with alike, the first ``known`` known to be."""
    n, end = known, min(len(a), len(b))
    while n < end and a[n] == b[n]:
        n += 1
    return n


def _until_eos(tokens: list[int], eos: frozenset[int]) -> list[int]:
    """``tokens`` up to and with the first end of sequence: the target stops there if it
    accepts it."""
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[: i + 1]
    return tokens


def draft_proposer(
    target: ServedModel, draft: ServedModel, settings: EngineSettings
) -> tuple[DraftModelProposer | None, str | None]:
    """A proposer drafting with ``draft`` for ``target``; None and why if it cannot."""
    why = vocabulary_difference(target, draft)
    options = settings.kv_for(draft.name).options
    sample = draft.make_cache(options)
    kinds = unrewindable(sample) or unbatchable(sample)
    if why is None and kinds:
        why = f"draft model {draft.name!r} has {' and '.join(kinds)} caches, which cannot be "
        why += "batched and rewound"
    if why is not None:
        return None, why
    proposer = DraftModelProposer(draft, options, settings.prefill_step_size, target.vocab_size)
    return proposer, None


def vocabulary_difference(target: ServedModel, draft: ServedModel) -> str | None:
    """What makes ``draft``'s tokens not ``target``'s (None: the same vocabulary and ends)."""
    theirs = f"draft model {draft.name!r} and model {target.name!r}"
    mine, its = target.tokenizer.get_vocab(), draft.tokenizer.get_vocab()
    if mine != its:
        differ = sorted(
            (t for t in mine.keys() | its.keys() if mine.get(t) != its.get(t)),
            key=lambda t: (min(mine.get(t, 1 << 62), its.get(t, 1 << 62)), t),
        )
        shown = ", ".join(
            f"{t!r} is {its.get(t, 'absent')} in {draft.name!r}, {mine.get(t, 'absent')} "
            f"in {target.name!r}"
            for t in differ[:3]
        )
        return (
            f"{theirs} have different vocabularies ({len(its)} and {len(mine)} tokens; "
            f"{len(differ)} differ: {shown}{', …' if len(differ) > 3 else ''})"
        )
    if draft.eos_token_ids != target.eos_token_ids:
        return (
            f"{theirs} end sequences with different tokens ({sorted(draft.eos_token_ids)} and "
            f"{sorted(target.eos_token_ids)})"
        )
    return None
