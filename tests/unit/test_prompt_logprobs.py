"""The prompt's log probabilities of one prefill chunk, against numpy's log-softmax."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlxserve.core.sampling.prompt_logprobs import score_chunk


def test_each_target_and_the_top_tokens_of_its_position() -> None:
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(5, 300)).astype(np.float32) * 4
    targets = [3, 250, 17, 99]  # the chunk's last position is followed by no prompt token
    scored = score_chunk(mx.array(logits), targets, top_n=3)
    logprobs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    assert [s.token_id for s in scored] == targets
    for row, (target, entry) in enumerate(zip(targets, scored, strict=True)):
        assert entry.logprob == pytest.approx(logprobs[row, target], abs=1e-5)
        top = np.argsort(-logprobs[row])[:3]
        assert [t for t, _ in entry.top] == top.tolist()
        assert [p for _, p in entry.top] == pytest.approx(logprobs[row, top], abs=1e-5)


def test_no_top_tokens_and_no_targets() -> None:
    logits = mx.zeros((2, 10))
    (only,) = score_chunk(logits, [4], top_n=0)
    assert only.top == () and only.logprob == pytest.approx(-np.log(10))
    assert score_chunk(logits, [], top_n=5) == []
