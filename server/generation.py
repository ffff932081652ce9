"""What chat and text completions share: admitting a request, and reading its outputs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from fastapi import Request

from mlxserve.core.config import Config
from mlxserve.core.engine import Engine, RequestStream
from mlxserve.core.errors import ModelNotFoundError
from mlxserve.core.sampling import InvalidParameterError, SamplingParams
from mlxserve.core.sequence import RequestOutput, TokenLogprob, Usage
from mlxserve.core.worker import ServedModel

from .errors import GenerationError, RequestTimeoutError
from .protocol import PromptTokensDetails, Timings, UsageInfo

DISCONNECT_POLL_S = 0.5


@dataclass
class Admitted:
    """A request the engine has accepted."""

    name: str
    model: ServedModel
    stream: RequestStream
    params: SamplingParams
    deadline: float
    watch: Request | None = None  # poll this request for a client that went away


@dataclass
class Collected:
    """Everything a finished non-streaming request produced."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage | None = None


async def admit(
    engine: Engine,
    config: Config,
    model_name: str | None,
    make_params: Callable[[object], SamplingParams],
    make_prompt: Callable[[ServedModel], list[int]],
) -> Admitted:
    """Resolve the model, load it if needed, tokenize and submit the request."""
    found = config.resolve_model(model_name or config.registry.default_model)
    if found is None:
        known = ", ".join(sorted(config.models))
        raise ModelNotFoundError(f"model {model_name!r} does not exist (available: {known})")
    name, entry = found
    params = make_params(entry)
    model = await engine.model(name)
    vocab = model.stage.layout.model.args.vocab_size
    if any(not 0 <= token < vocab for token, _ in params.logit_bias):
        raise InvalidParameterError("logit_bias", f"token ids must be below {vocab}")
    prompt = make_prompt(model)
    if any(not 0 <= token < vocab for token in prompt):
        raise InvalidParameterError("prompt", f"token ids must be below {vocab}")
    stream = engine.submit(model, prompt, params)
    deadline = time.monotonic() + config.server.request_timeout_s
    return Admitted(name, model, stream, params, deadline)


async def outputs(engine: Engine, admitted: Admitted) -> AsyncIterator[RequestOutput]:
    """The request's outputs; aborts it if the client goes away or time runs out."""
    finished = False
    try:
        while True:
            left = admitted.deadline - time.monotonic()
            if left <= 0:
                raise RequestTimeoutError(
                    "the request did not finish within [server] request_timeout_s"
                )
            try:
                output = await asyncio.wait_for(admitted.stream.get(), min(left, DISCONNECT_POLL_S))
            except asyncio.TimeoutError:
                if admitted.watch is not None and await admitted.watch.is_disconnected():
                    return
                continue
            if output.finish_reason == "error":
                finished = True
                raise GenerationError(output.error or "generation failed")
            finished = output.finish_reason is not None
            yield output
            if finished:
                return
    finally:
        if not finished:
            engine.abort(admitted.stream.request_id)


async def collect(engine: Engine, admitted: Admitted, request: Request) -> Collected:
    result = Collected()
    admitted.watch = request
    async for output in outputs(engine, admitted):
        result.text += output.text
        result.token_ids.extend(output.token_ids)
        result.logprobs.extend(output.logprobs)
        result.finish_reason = output.finish_reason
        result.usage = output.usage
    return result


def usage_info(usage: Usage) -> UsageInfo:
    return UsageInfo(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=usage.cached_tokens),
    )


def timings(usage: Usage) -> Timings | None:
    if usage.ttft_s is None:
        return None
    decode_s = usage.decode_s or 0.0
    generated = max(usage.completion_tokens - 1, 0)
    return Timings(
        ttft_s=round(usage.ttft_s, 6),
        tokens_per_s=round(generated / decode_s, 3) if decode_s > 0 else 0.0,
        prompt_tokens_per_s=round(usage.prompt_tokens / usage.ttft_s, 3) if usage.ttft_s else None,
    )


def finish_reason(reason: str | None) -> str | None:
    """OpenAI knows "stop" and "length"; an abort never reaches a client that is still there."""
    return reason if reason in ("stop", "length") else None


def token_text(model: ServedModel, token: int) -> str:
    return model.tokenizer.decode([token])
