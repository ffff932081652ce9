"""The engine's pieces for tests that drive them directly: sequences for the scheduler,
greedy tokens straight from a loaded model's forward pass (no engine at all), and mlx-lm's
own greedy text, the reference served text is compared with."""

from __future__ import annotations

import functools
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.generate import generate_step
from mlx_lm.utils import load_model

from mlxserve.core.engine.detokenizer import TextStream
from mlxserve.core.engine.plan import StepPlan
from mlxserve.core.engine.scheduler import Scheduler
from mlxserve.core.engine.sequence import Sequence
from mlxserve.core.kv.caches import KVCacheOptions
from mlxserve.core.sampling.params import SamplingParams
from mlxserve.registry.models import LoadedModel, load_tokenizer_of


def make_seq(request_id: str, prompt: list[int], tokenizer=None, **params: object) -> Sequence:  # noqa: ANN001
    """A sequence of ``prompt`` sampled with ``params`` (eos is token 0); with a tokenizer,
    its text is streamed too."""
    return Sequence(
        request_id=request_id,
        model="m",
        prompt_ids=prompt,
        params=SamplingParams(**params),
        max_tokens=10 if params.get("max_tokens") is None else int(params["max_tokens"]),
        eos_ids=frozenset({0}),
        seed=int(params.get("seed") or 1),
        text=TextStream(tokenizer, ()) if tokenizer else None,
    )


def sampled(scheduler: Scheduler, plan: StepPlan) -> list[Sequence]:
    """The sequences whose tokens ``plan`` samples, in its order."""
    return [scheduler.find(request_id) for request_id in plan.sample_ids]


def greedy(model: LoadedModel, prompt: list[int], steps: int = 16) -> list[int]:
    """``steps`` greedy tokens after ``prompt``, from the model's forward pass alone."""
    caches = model.make_cache(KVCacheOptions())
    logits = model.stage.forward(mx.array([prompt]), caches)
    tokens = []
    for _ in range(steps):
        tokens.append(int(mx.argmax(logits[0, -1])))
        logits = model.stage.forward(mx.array([tokens[-1:]]), caches)
    return tokens


def mlx_lm_greedy(
    path: Path, prompt: list[int], max_tokens: int, *, stop_at_eos: bool = True
) -> str:
    """mlx-lm's own greedy generation after ``prompt`` (its model, its caches, its loop), as
    text without special tokens: the reference served text is compared with."""
    model, config = load_model(Path(path))
    tokenizer = load_tokenizer_of(Path(path), config.get("eos_token_id"))
    tokens = []
    steps = generate_step(
        mx.array(prompt), model, max_tokens=max_tokens, sampler=lambda x: mx.argmax(x, -1)
    )
    for token, _ in steps:
        if stop_at_eos and int(token) in tokenizer.eos_token_ids:
            break
        tokens.append(int(token))
    return tokenizer._tokenizer.decode(tokens, skip_special_tokens=True)


@functools.cache
def _mlx_lm_model(path: Path) -> nn.Module:
    model, _ = load_model(path)
    return model


def mlx_lm_logprobs(path: Path, prompt: list[int]) -> np.ndarray:
    """mlx-lm's own model on ``prompt`` in one call, log-softmax at every position (P, V):
    row i is how likely each token is to follow the prompt's first i + 1 tokens."""
    logits = _mlx_lm_model(Path(path))(mx.array([prompt]))[0].astype(mx.float32)
    return np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
