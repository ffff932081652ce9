"""Verifying drafted tokens: the target model's own choice at each position, kept while it is
the drafted token.

A draft is a single proposal, so speculative sampling's rule — keep a drafted token with the
target's probability of it, else draw from the rest — is the same as drawing from the target's
distribution and keeping on while the draw equals the draft. Each position is drawn exactly as
plain decoding would draw it (the same penalties, grammar mask, thinking budget and seeded
randomness, all advanced by the tokens before it), so the output is what decoding without
speculation gives, token for token, at any temperature.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import replace

import mlx.core as mx
import numpy as np

from mlxserve.core.engine.sequence import RequestOutput, Sequence, TokenLogprob
from mlxserve.core.sampling.constraint import compute_masks
from mlxserve.core.sampling.sampler import sample_each

Advance = Callable[[Sequence, int | Exception, TokenLogprob | None], RequestOutput]


def verify(
    logits: mx.array,
    rows: Seq[tuple[int, int]],
    seqs: Seq[Sequence],
    drafts: Seq[tuple[int, ...]],
    masks: np.ndarray | None,
    advance: Advance,
) -> list[RequestOutput]:
    """Each sequence's output for one verification step.

    ``logits`` holds ``rows[i]`` = (first row, count) for ``seqs[i]``: its positions from its
    last token on, one per token of ``drafts[i]`` plus one. ``masks`` are the grammar masks of
    the first positions, computed ahead. ``advance`` takes a token into a sequence. Each
    sequence's ``drafted`` and ``accepted`` counts grow by this step's.

    A sequence whose draws do not depend on the tokens before them (no grammar, penalties or
    open thinking block) has all its positions drawn at once; the others position by position.
    """
    outputs: list[list[RequestOutput]] = [[] for _ in seqs]
    alone = [i for i, seq in enumerate(seqs) if _draws_alone(seq)]
    if alone:
        _at_once(
            logits,
            [rows[i] for i in alone],
            [seqs[i] for i in alone],
            alone,
            drafts,
            advance,
            outputs,
        )
    rest = sorted(set(range(len(seqs))) - set(alone))
    if rest:
        first = None if masks is None else masks[rest]
        _in_turn(logits, rows, seqs, drafts, rest, first, advance, outputs)
    for seq, draft, each in zip(seqs, drafts, outputs, strict=True):
        seq.drafted += len(draft)
        if each[-1].usage is not None:  # its last: count this step's drafts in its usage
            each[-1] = replace(each[-1], usage=seq.usage())
    return [joined(each) for each in outputs]


def _draws_alone(seq: Sequence) -> bool:
    thinking = seq.thinking
    return (
        seq.constraint is None
        and not seq.params.penalized
        and (thinking is None or not thinking.inside)
    )


def _kept(seq: Sequence, output: RequestOutput, draft: tuple[int, ...], position: int) -> bool:
    """Whether ``output`` took the drafted token of ``position`` (then it counts as accepted,
    and the next position's logits hold)."""
    if output.token_ids and position < len(draft) and seq.last_token == draft[position]:
        seq.accepted += 1
        return output.finish_reason is None
    return False


def _at_once(
    logits: mx.array,
    rows: Seq[tuple[int, int]],
    seqs: Seq[Sequence],
    indices: Seq[int],
    drafts: Seq[tuple[int, ...]],
    advance: Advance,
    outputs: list[list[RequestOutput]],
) -> None:
    at = [start + j for start, count in rows for j in range(count)]
    who = [seq for seq, (_, count) in zip(seqs, rows, strict=True) for _ in range(count)]
    ahead = [j for _, count in rows for j in range(count)]
    tokens, logprobs = sample_each(logits[mx.array(at)], who, None, ahead)
    first = 0
    for i, seq, (_, count) in zip(indices, seqs, rows, strict=True):
        for position in range(count):
            output = advance(seq, tokens[first + position], logprobs[first + position])
            outputs[i].append(output)
            if not _kept(seq, output, drafts[i], position):
                break
        first += count


def _in_turn(
    logits: mx.array,
    rows: Seq[tuple[int, int]],
    seqs: Seq[Sequence],
    drafts: Seq[tuple[int, ...]],
    active: list[int],
    masks: np.ndarray | None,
    advance: Advance,
    outputs: list[list[RequestOutput]],
) -> None:
    position = 0
    while active:
        at = mx.array([rows[i][0] + position for i in active])
        group = [seqs[i] for i in active]
        if position:
            masks = compute_masks([s.constraint for s in group])
        tokens, logprobs = sample_each(logits[at], group, masks)
        going = []
        for i, token, logprob in zip(active, tokens, logprobs, strict=True):
            output = advance(seqs[i], token, logprob)
            outputs[i].append(output)
            if _kept(seqs[i], output, drafts[i], position):
                going.append(i)
        active, position = going, position + 1


def joined(outputs: Seq[RequestOutput]) -> RequestOutput:
    """Consecutive outputs of one request as one."""
    if len(outputs) == 1:
        return outputs[0]
    last = outputs[-1]
    scored = next((o.prompt_logprobs for o in outputs if o.prompt_logprobs is not None), None)
    return RequestOutput(
        last.request_id,
        text="".join(o.text for o in outputs),
        token_ids=tuple(t for o in outputs for t in o.token_ids),
        logprobs=tuple(lp for o in outputs for lp in o.logprobs),
        finish_reason=last.finish_reason,
        error=last.error,
        usage=last.usage,
        stop_sequence=last.stop_sequence,
        error_kind=last.error_kind,
        prompt_logprobs=scored,
    )
