"""A prompt's log probabilities (for echo), one prefill chunk at a time.

The log-softmax, the gather and the top-N run on the device over the chunk's logits; only
(1 + 2N) numbers a position reach Python, never a vocabulary's row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import mlx.core as mx

from mlxserve.core.engine.sequence import TokenLogprob


def score_chunk(logits: mx.array, targets: Sequence[int], top_n: int) -> list[TokenLogprob]:
    """How likely each of ``targets`` was, given the positions before it.

    ``logits`` (L, V) are a chunk's logits, position by position; ``targets[i]`` is the token
    that followed position i (there may be fewer targets than positions: the last position of
    a prompt is followed by a sampled token, not a prompt token). Each result has the ``top_n``
    most likely tokens at its position, most likely first.
    """
    if not targets:
        return []
    rows = logits[: len(targets)].astype(mx.float32)
    logprobs = rows - mx.logsumexp(rows, axis=-1, keepdims=True)
    chosen = mx.take_along_axis(logprobs, mx.array(list(targets))[:, None], axis=-1)[:, 0]
    top_n = min(top_n, logprobs.shape[-1])
    if top_n:
        ids = mx.argpartition(-logprobs, kth=top_n - 1, axis=-1)[:, :top_n]
        values = mx.take_along_axis(logprobs, ids, axis=-1)
        order = mx.argsort(-values, axis=-1)
        ids = mx.take_along_axis(ids, order, axis=-1)
        values = mx.take_along_axis(values, order, axis=-1)
    else:
        ids = values = mx.zeros((len(targets), 0))
    mx.eval(chosen, ids, values)
    chosen_list = cast("list[float]", chosen.tolist())
    id_rows = cast("list[list[int]]", ids.tolist())
    value_rows = cast("list[list[float]]", values.tolist())
    return [
        TokenLogprob(token, logprob, tuple(zip(top_ids, top_values, strict=True)))
        for token, logprob, top_ids, top_values in zip(
            targets, chosen_list, id_rows, value_rows, strict=True
        )
    ]
