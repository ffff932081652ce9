"""Choosing each sequence's next token from its logits, with its own sampling parameters."""

from __future__ import annotations

import math
from collections.abc import Sequence as Seq
from typing import cast

import mlx.core as mx
import numpy as np

from mlxserve.core.engine.sequence import Sequence, TokenLogprob
from mlxserve.core.sampling.constraint import mask_logits
from mlxserve.core.sampling.params import SamplingParams

# How many of the most likely tokens top-k, top-p and min-p rank first (see _filter).
CANDIDATES = 256


def _adjust_row(row: mx.array, seq: Sequence) -> mx.array:
    params = seq.params
    if params.penalized and seq.token_counts:
        ids = mx.array(list(seq.token_counts))
        counts = mx.array(list(seq.token_counts.values()), dtype=mx.float32)
        seen = row[ids]
        if params.repetition_penalty != 1.0:
            penalty = params.repetition_penalty
            seen = mx.where(seen > 0, seen / penalty, seen * penalty)
        seen = seen - params.presence_penalty - params.frequency_penalty * counts
        row[ids] = seen
    if params.logit_bias:
        ids = mx.array([i for i, _ in params.logit_bias])
        row[ids] = row[ids] + mx.array([b for _, b in params.logit_bias])
    return row


def _filter(logits: mx.array, params: Seq[SamplingParams]) -> mx.array:
    """Mask (to -inf) the tokens top-k, top-p and min-p rule out, row by row.

    A full sort of the vocabulary costs milliseconds a row on a CPU, while these filters keep
    few tokens of the peaked distributions models give: only the most likely candidates are
    ranked, and the whole vocabulary only when some row would keep all of them.
    """
    vocab = logits.shape[-1]
    width = max([CANDIDATES, *(p.top_k for p in params)])
    if width < vocab:
        kept = _keep(logits, params, width)
        if kept is not None:
            return kept
    kept = _keep(logits, params, vocab)
    assert kept is not None
    return kept


def _keep(logits: mx.array, params: Seq[SamplingParams], width: int) -> mx.array | None:
    """The filtered logits, ranking the ``width`` most likely tokens of each row; None when a
    row would keep its last ranked token (then the ranking was too short to be exact)."""
    vocab = logits.shape[-1]
    if width < vocab:
        order = mx.argpartition(-logits, kth=width - 1, axis=-1)[:, :width]
        resort = mx.argsort(-mx.take_along_axis(logits, order, axis=-1), axis=-1)
        order = mx.take_along_axis(order, resort, axis=-1)
    else:
        order = mx.argsort(-logits, axis=-1)
    ranked = mx.take_along_axis(logits, order, axis=-1)
    probs = mx.exp(ranked - mx.logsumexp(logits, axis=-1, keepdims=True))
    positions = mx.arange(width)[None]
    top_k = mx.array([min(p.top_k or vocab, vocab) for p in params])[:, None]
    top_p = mx.array([p.top_p for p in params])[:, None]
    min_p = mx.array([p.min_p for p in params])[:, None]
    mass_before = mx.cumsum(probs, axis=-1) - probs
    keep = (positions < top_k) & (mass_before < top_p) & (probs >= min_p * probs[:, :1])
    filtered = mx.array([bool(p.top_k or p.top_p < 1 or p.min_p > 0) for p in params])[:, None]
    if width < vocab and (keep[:, -1:] & filtered).any().item():
        return None
    masked = mx.where(keep, ranked, -mx.inf)
    kept = mx.put_along_axis(mx.full(logits.shape, -mx.inf), order, masked, axis=-1)
    return mx.where(filtered, kept, logits)


def _gumbel_noise(seqs: Seq[Sequence], vocab: int, ahead: Seq[int] | None) -> mx.array:
    ahead = ahead or [0] * len(seqs)
    keys = [
        mx.random.key(hash((s.seed, len(s.output_ids) + a)) & (2**63 - 1))
        for s, a in zip(seqs, ahead, strict=True)
    ]
    return mx.stack([mx.random.gumbel((vocab,), key=k) for k in keys])


def sample(
    logits: mx.array,
    seqs: Seq[Sequence],
    masks: np.ndarray | None = None,
    ahead: Seq[int] | None = None,
) -> tuple[list[int], list[TokenLogprob | None]]:
    """One token per row of ``logits`` (rows in the order of ``seqs``; a sequence may have
    several rows, ``ahead[i]`` tokens past its output so far: drafted positions).

    A seeded request draws the same tokens whatever else is in the batch: each draw's
    randomness comes from the request's seed and the token's position alone. A sequence's
    grammar (its constraint) masks its row before anything else, so penalties, temperature,
    top-k/p and logprobs all see only the tokens the grammar allows; ``masks`` are the rows'
    grammar bitmasks if they were computed ahead (see :func:`constraint.start_masks`).
    """
    logits = mask_logits(logits.astype(mx.float32), [s.constraint for s in seqs], masks)
    if any(s.params.penalized or s.params.logit_bias for s in seqs):
        logits = mx.stack([_adjust_row(logits[i], s) for i, s in enumerate(seqs)])
    greedy = mx.argmax(logits, axis=-1)
    if all(s.params.greedy for s in seqs):
        tokens = greedy
    else:
        params = [s.params for s in seqs]
        scaled = logits / mx.array([max(p.temperature, 1e-5) for p in params])[:, None]
        if any(p.top_k or p.top_p < 1 or p.min_p > 0 for p in params):
            scaled = _filter(scaled, params)
        drawn = mx.argmax(scaled + _gumbel_noise(seqs, logits.shape[-1], ahead), axis=-1)
        tokens = mx.where(mx.array([p.greedy for p in params]), greedy, drawn)
    token_list = cast("list[int]", tokens.tolist())  # one token id a row
    if not any(s.params.wants_logprobs for s in seqs):
        return token_list, [None] * len(seqs)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return token_list, [
        _logprob(logprobs[i], token_list[i], s.params.top_logprobs)
        if s.params.wants_logprobs
        else None
        for i, s in enumerate(seqs)
    ]


def _logprob(row: mx.array, token: int, top_n: int) -> TokenLogprob:
    top: tuple[tuple[int, float], ...] = ()
    if top_n:
        ids = cast("list[int]", mx.argsort(-row)[:top_n].tolist())
        values = cast("list[float]", row[mx.array(ids)].tolist())
        pairs = zip(ids, values, strict=True)
        top = tuple((i, p) for i, p in pairs if p > -math.inf)  # a grammar's ruled-out tokens
    return TokenLogprob(token, float(row[token]), top)


def sample_each(
    logits: mx.array,
    seqs: Seq[Sequence],
    masks: np.ndarray | None = None,
    ahead: Seq[int] | None = None,
) -> tuple[list[int | Exception], list[TokenLogprob | None]]:
    """Like :func:`sample`, but a row that cannot be sampled gives its error, not everyone's.

    The batch is sampled at once; only if that fails is each row sampled on its own, so one
    sequence's bad parameters end that sequence alone.
    """
    try:
        tokens, logprobs = sample(logits, seqs, masks, ahead)
        return list(tokens), logprobs
    except Exception:
        pass
    tokens_each: list[int | Exception] = []
    logprobs_each: list[TokenLogprob | None] = []
    token: int | Exception
    logprob: TokenLogprob | None
    for row, seq in enumerate(seqs):
        try:
            row_masks = None if masks is None else masks[row : row + 1]
            row_ahead = None if ahead is None else ahead[row : row + 1]
            (token,), (logprob,) = sample(logits[row : row + 1], [seq], row_masks, row_ahead)
        except Exception as exc:
            token, logprob = exc, None
        tokens_each.append(token)
        logprobs_each.append(logprob)
    return tokens_each, logprobs_each
