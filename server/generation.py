"""What chat and text completions share: admitting a request, and reading its outputs."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import Request

from mlxserve.core.config.schema import Config, ModelEntry
from mlxserve.core.engine.engine import Engine, RequestStream
from mlxserve.core.engine.sequence import RequestOutput, TokenLogprob, Usage
from mlxserve.core.engine.worker import ServedModel
from mlxserve.core.errors import ContextLengthError, EngineUnavailableError, ModelNotFoundError
from mlxserve.core.metrics import EngineMetrics
from mlxserve.core.sampling.constraint import Constraint, GrammarError, compile_constraint
from mlxserve.core.sampling.params import InvalidParameterError, SamplingParams
from mlxserve.server.errors import GenerationError, OutputFormatError, RequestTimeoutError
from mlxserve.server.protocol.openai import PromptTokensDetails, Timings, UsageInfo
from mlxserve.server.tokenizing import with_own_tokenizer

# No text averages more characters per token than this: a longer prompt cannot fit.
MAX_CHARS_PER_TOKEN = 32

ParamsFactory = Callable[[ModelEntry | None, Mapping[str, float] | None], SamplingParams]
# (model, the tokenizing thread's copy of its tokenizer) -> prompt ids / grammar
PromptFactory = Callable[[ServedModel, Any], list[int]]
GrammarFactory = Callable[[ServedModel, Any], str | None]


@dataclass
class Admitted:
    """A request the engine has accepted."""

    name: str
    model: ServedModel
    stream: RequestStream
    params: SamplingParams
    deadline: float
    metrics: EngineMetrics | None = None
    prompt_tokens: int = 0

    def ended_early(self, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.request_error(self.name, kind)


@dataclass
class Collected:
    """Everything a finished non-streaming request produced."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage | None = None


def _context_error(limit: int, what: str) -> ContextLengthError:
    return ContextLengthError(f"this model's context is {limit} tokens, but the prompt has {what}")


def _prepare(
    model: ServedModel,
    tokenizer: Any,
    make_prompt: PromptFactory,
    grammar: str | GrammarFactory | None,
    limit: int,
    vocab: int,
) -> tuple[list[int], str | None]:
    """Tokenize and check a prompt, and say its grammar; on a tokenizing thread, with that
    thread's own copy of the tokenizer."""
    prompt = make_prompt(model, tokenizer)
    if not prompt:
        raise InvalidParameterError("prompt", "must not be empty")
    if len(prompt) > limit:
        raise _context_error(limit, f"{len(prompt)} tokens")
    if not (min(prompt) >= 0 and max(prompt) < vocab):
        raise InvalidParameterError("prompt", f"token ids must be below {vocab}")
    if callable(grammar):
        grammar = grammar(model, tokenizer)
    return prompt, grammar


async def _constraint(model: ServedModel, grammar: str, vocab: int, param: str) -> Constraint:
    """Compile a grammar for this model on the grammar compile threads (large stacks, a time
    limit), never on the event loop."""
    try:
        return await compile_constraint(model.tokenizer, vocab, grammar)
    except GrammarError as exc:
        raise InvalidParameterError(param, f"cannot be compiled: {exc}") from exc


def _checked_params(params: SamplingParams, vocab: int) -> SamplingParams:
    if any(not 0 <= token < vocab for token, _ in params.logit_bias):
        raise InvalidParameterError("logit_bias", f"token ids must be below {vocab}")
    if any(not 0 <= token < vocab for token in params.stop_token_ids):
        raise InvalidParameterError("stop_token_ids", f"token ids must be below {vocab}")
    if params.top_k >= vocab:  # keeps every token: the same as off
        params = replace(params, top_k=0)
    return params


async def admit(
    engine: Engine,
    config: Config,
    model_name: str | None,
    make_params: ParamsFactory,
    make_prompt: PromptFactory,
    *,
    prompt_chars: int = 0,
    metrics: EngineMetrics | None = None,
    grammar: str | GrammarFactory | None = None,
    grammar_param: str = "response_format",
) -> Admitted:
    """Resolve the model, load it if needed, tokenize (off the event loop) and submit.

    ``prompt_chars`` is the length of the text ``make_prompt`` tokenizes: a text far longer
    than the context is refused before any tokenizing. A place in the queue is taken before
    any work that grows with the request (a full queue is refused at once). ``grammar``
    (llguidance Lark text, or a function giving it, called after ``make_prompt`` with the
    same tokenizer) is compiled off the event loop and constrains the output; one that
    cannot be compiled is an InvalidParameterError naming ``grammar_param``.
    """
    found = config.resolve_model(model_name or config.registry.default_model)
    if found is None:
        known = ", ".join(sorted(config.models))
        raise ModelNotFoundError(f"model {model_name!r} does not exist (available: {known})")
    name, entry = found
    params = make_params(entry, None)  # refuse bad parameters before loading anything
    model = await engine.model(name)
    family_defaults = getattr(getattr(model, "family", None), "sampling_defaults", None)
    if family_defaults:
        params = make_params(entry, family_defaults)
    vocab = model.stage.layout.model.args.vocab_size
    params = _checked_params(params, vocab)
    limit = min(config.kv_cache_for(name).max_sequence_length, model.context_length)
    if prompt_chars > limit * MAX_CHARS_PER_TOKEN:
        raise _context_error(limit, f"{prompt_chars} characters, far more than fit")
    slot = engine.reserve()  # before any work that grows with the request
    try:
        prompt, grammar_text = await with_own_tokenizer(
            model.tokenizer,
            lambda tokenizer: _prepare(model, tokenizer, make_prompt, grammar, limit, vocab),
        )
        constraint = None
        if grammar_text is not None:
            constraint = await _constraint(model, grammar_text, vocab, grammar_param)
        stream = engine.submit(model, prompt, params, constraint=constraint, slot=slot)
    finally:
        slot.release()  # a no-op once the request is queued
    deadline = time.monotonic() + config.server.request_timeout_s
    return Admitted(name, model, stream, params, deadline, metrics, len(prompt))


def watch_disconnect(engine: Engine, admitted: Admitted, request: Request) -> asyncio.Task:
    """A task that aborts the request as soon as its client goes away (cancel it when the
    response is done). It waits on the ASGI channel itself, so the abort is immediate."""

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        if not admitted.stream.finished:
            admitted.ended_early("client_disconnected")
            engine.abort(admitted.stream.request_id)

    return asyncio.create_task(watch())


async def stop_watching(watcher: asyncio.Task) -> None:
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher


async def outputs(engine: Engine, admitted: Admitted) -> AsyncIterator[RequestOutput]:
    """The request's outputs; aborts it if they are not all read or time runs out."""
    finished = False
    try:
        while True:
            left = admitted.deadline - time.monotonic()
            if left <= 0:
                admitted.ended_early("timeout")
                raise RequestTimeoutError(
                    "the request did not finish within [server] request_timeout_s"
                )
            try:
                output = await asyncio.wait_for(admitted.stream.get(), left)
            except asyncio.TimeoutError:
                continue
            if output.finish_reason == "error":
                finished = True
                message = output.error or "generation failed"
                if engine.shutting_down or engine.error is not None:  # not this request's fault
                    admitted.ended_early("engine_unavailable")
                    raise EngineUnavailableError(message)
                if output.error_kind == "grammar":  # the request's own grammar gave up
                    admitted.ended_early("output_format_failed")
                    raise OutputFormatError(message)
                admitted.ended_early("generation_failed")
                raise GenerationError(message)
            finished = output.finish_reason is not None
            yield output
            if finished:
                return
    finally:
        if not finished:
            engine.abort(admitted.stream.request_id)


async def collect(engine: Engine, admitted: Admitted, request: Request) -> Collected:
    result = Collected()
    watcher = watch_disconnect(engine, admitted, request)
    try:
        async for output in outputs(engine, admitted):
            result.text += output.text
            result.token_ids.extend(output.token_ids)
            result.logprobs.extend(output.logprobs)
            result.finish_reason = output.finish_reason
            result.usage = output.usage
    finally:
        await stop_watching(watcher)
    if result.usage is None:  # aborted before it began (its client is gone anyway)
        result.usage = Usage(prompt_tokens=0, completion_tokens=len(result.token_ids))
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
