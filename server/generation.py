"""Admitting a request, and reading its outputs: between the shared pipeline
(``server.conversation``) and the engine.

:func:`admit` runs once per request, in one pass: resolve the model name, load the model,
settle the sampling parameters, take a place in the queue, prepare the prompt and its grammar
(:func:`prepare`, on a tokenizing thread), compile the grammar, submit.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from fastapi import Request

from mlxserve.core.config.schema import Config
from mlxserve.core.engine.engine import Engine, RequestStream
from mlxserve.core.engine.sequence import RequestOutput, Usage
from mlxserve.core.engine.settings import sequence_limit
from mlxserve.core.engine.worker import ServedModel
from mlxserve.core.errors import ContextLengthError, EngineUnavailableError
from mlxserve.core.metrics import EngineMetrics
from mlxserve.core.sampling.constraint import Constraint, GrammarError, compile_constraint
from mlxserve.core.sampling.params import InvalidParameterError, SamplingParams
from mlxserve.core.sampling.thinking import Thinking
from mlxserve.plugins.chat_prompt import render_chat_prompt
from mlxserve.plugins.tool_calls import marker_token_ids
from mlxserve.server.errors import GenerationError, OutputFormatError, RequestTimeoutError
from mlxserve.server.protocol.openai import (
    CompletionTokensDetails,
    PromptTokensDetails,
    Timings,
    UsageInfo,
)
from mlxserve.server.protocol.request import (
    MAX_CHARS_PER_TOKEN,
    Conversation,
    Prompt,
    RawPrompt,
    RequestedSampling,
)
from mlxserve.server.structured import (
    bounded_tools,
    check_tool_schemas,
    grammar_for_response_format,
)
from mlxserve.server.tokenizing import with_own_tokenizer


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
    reasoning_open: bool = False  # the prompt opened a reasoning block: the reply starts in it
    prompt_ids: tuple[int, ...] = ()

    def ended_early(self, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.request_error(self.name, kind)


def _context_error(limit: int, what: str, prompt_tokens: int) -> ContextLengthError:
    return ContextLengthError(
        f"this model's context is {limit} tokens, but the prompt has {what}",
        limit=limit,
        prompt_tokens=prompt_tokens,
    )


def _check_chars(prompt: Prompt, limit: int) -> None:
    """Refuse a prompt whose characters (counted, never tokenized) cannot fit ``limit``."""
    chars = prompt.chars
    if chars > limit * MAX_CHARS_PER_TOKEN:
        at_least = -(-chars // MAX_CHARS_PER_TOKEN)  # tokens it has at least: over ``limit``
        raise _context_error(limit, f"{chars} characters, far more than fit", at_least)


@dataclass(frozen=True)
class Prepared:
    """A request's prompt token ids, the grammar that constrains its output (llguidance Lark
    text; None: unconstrained), and, when the prompt opens a reasoning block, the token ids
    of the marker that ends it (empty: the reply does not start in reasoning)."""

    ids: list[int]
    grammar: str | None
    reasoning_end: tuple[int, ...] = ()


# Enough of a prompt's end to hold the marker that opens a reasoning block, and whitespace.
REASONING_TAIL_TOKENS = 16


def prepare(
    prompt: Prompt, model: ServedModel, tokenizer: Any, limit: int, open_tool_schemas: bool = False
) -> Prepared:
    """The prompt, checked against the model, and its grammar (see :class:`Prepared`). Runs
    on a tokenizing thread, with that thread's own copy of the model's tokenizer.

    A conversation goes through the model's chat template and tool-call format; forced tool
    calls and JSON output formats become its grammar, which follows the reasoning when the
    prompt opens a reasoning block. A raw prompt is tokenized as it is (or taken as token
    ids); its output format is its grammar.
    """
    ids = prompt_ids(prompt, model, tokenizer)
    if not ids:
        raise InvalidParameterError("prompt", "must not be empty")
    if len(ids) > limit:
        raise _context_error(limit, f"{len(ids)} tokens", len(ids))
    vocab = model.vocab_size
    if not (min(ids) >= 0 and max(ids) < vocab):
        raise InvalidParameterError("prompt", f"token ids must be below {vocab}")
    if isinstance(prompt, RawPrompt):
        return Prepared(ids, grammar_for_response_format(prompt.response_format))
    return Prepared(
        ids,
        _chat_grammar(prompt, model, tokenizer, closed=not open_tool_schemas),
        _reasoning_end(ids, model, tokenizer),
    )


def prompt_ids(prompt: Prompt, model: ServedModel, tokenizer: Any) -> list[int]:
    """The prompt's token ids: a conversation through the model's chat template and
    tool-call format, a raw prompt tokenized as it is (or taken as token ids)."""
    if isinstance(prompt, RawPrompt):
        text_or_ids = prompt.prompt
        return list(tokenizer.encode(text_or_ids) if isinstance(text_or_ids, str) else text_or_ids)
    return _chat_prompt(prompt, model, tokenizer)


def _reasoning_end(ids: list[int], model: ServedModel, tokenizer: Any) -> tuple[int, ...]:
    fmt = model.reasoning_format
    if fmt is None or not fmt.opens_in(tokenizer.decode(ids[-REASONING_TAIL_TOKENS:])):
        return ()
    return tuple(tokenizer.encode(fmt.end, add_special_tokens=False))


def _chat_prompt(conversation: Conversation, model: ServedModel, tokenizer: Any) -> list[int]:
    try:
        return render_chat_prompt(
            tokenizer,
            model.family,
            model.tool_call_format,
            conversation.messages,
            conversation.tools,
            conversation.template_kwargs,
        )
    except InvalidParameterError:
        raise
    except Exception as exc:  # Jinja templates raise their own errors for bad input
        raise InvalidParameterError(
            "messages", f"the chat template rejected the messages: {exc}"
        ) from exc


def _chat_grammar(
    conversation: Conversation, model: ServedModel, tokenizer: Any, *, closed: bool
) -> str | None:
    if not conversation.forces_a_call:
        return grammar_for_response_format(conversation.response_format)
    fmt = model.tool_call_format
    if fmt is None:
        raise InvalidParameterError("tool_choice", "this model's family has no tool calls")
    special = marker_token_ids(fmt, tokenizer)
    if conversation.tool_choice == "required":
        check_tool_schemas(conversation.tools)
        tools = bounded_tools(conversation.tools, closed=closed)
        return fmt.grammar(tools, parallel=conversation.parallel_tool_calls, special=special)
    check_tool_schemas(conversation.tools, [conversation.tool_choice])
    named = [t for t in conversation.tools if t["function"]["name"] == conversation.tool_choice]
    return fmt.grammar(bounded_tools(named, closed=closed), parallel=False, special=special)


async def _constraint(model: ServedModel, grammar: str, param: str) -> Constraint:
    """Compile a grammar for this model on the grammar compile threads (large stacks, a time
    limit), never on the event loop."""
    try:
        return await compile_constraint(model.tokenizer, model.vocab_size, grammar)
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
    prompt: Prompt,
    sampling: RequestedSampling,
    *,
    metrics: EngineMetrics | None = None,
) -> Admitted:
    """Resolve the model (None: the default), load it if needed, settle the sampling
    parameters, prepare the prompt and grammar (off the event loop) and submit.

    The prompt's characters are counted first: a text far longer than the context is refused
    before any tokenizing. A place in the queue is taken before any work that grows with the
    request (a full queue is refused at once). A grammar that cannot be compiled is an
    InvalidParameterError naming the prompt's ``grammar_param``.
    """
    name, entry = config.resolve_model(model_name)
    model = await engine.model(name)
    params = sampling.with_defaults(entry.sampling_defaults, model.sampling_defaults)
    params = _checked_params(params, model.vocab_size)
    limit = sequence_limit(config.kv_cache_for(name).max_sequence_length, model.context_length)
    _check_chars(prompt, limit)
    slot = engine.reserve()  # before any work that grows with the request
    try:
        prepared = await with_own_tokenizer(
            model.tokenizer,
            lambda tokenizer: prepare(
                prompt, model, tokenizer, limit, config.structured.open_tool_schemas
            ),
        )
        constraint = None
        if prepared.grammar is not None:
            constraint = await _constraint(model, prepared.grammar, prompt.grammar_param)
        thinking = _thinking(prompt, prepared, constraint)
        if thinking is not None:
            constraint = None  # thinking holds it until the reasoning ends
        stream = engine.submit(
            model, prepared.ids, params, constraint=constraint, slot=slot, thinking=thinking
        )
    finally:
        slot.release()  # a no-op once the request is queued
    deadline = time.monotonic() + config.server.request_timeout_s
    opened = bool(prepared.reasoning_end)
    return Admitted(
        name,
        model,
        stream,
        params,
        deadline,
        metrics,
        len(prepared.ids),
        opened,
        tuple(prepared.ids),
    )


async def count_prompt_tokens(
    engine: Engine, config: Config, model_name: str | None, prompt: Prompt
) -> tuple[str, int]:
    """``(model name, prompt tokens)``: the prompt's length as :func:`admit` would render it
    for the model (loaded if needed), nothing submitted. As in :func:`admit`, a text far
    longer than the context is refused before tokenizing, and the tokenizing holds a place
    in the queue; a prompt longer than the context is counted all the same."""
    name, _ = config.resolve_model(model_name)
    model = await engine.model(name)
    limit = sequence_limit(config.kv_cache_for(name).max_sequence_length, model.context_length)
    _check_chars(prompt, limit)
    slot = engine.reserve()
    try:
        ids = await with_own_tokenizer(
            model.tokenizer, lambda tokenizer: prompt_ids(prompt, model, tokenizer)
        )
    finally:
        slot.release()
    return name, len(ids)


def _thinking(prompt: Prompt, prepared: Prepared, constraint: Constraint | None) -> Thinking | None:
    """What the engine must do about a reasoning block the prompt opens: count its tokens,
    end it at the request's budget, and keep the grammar for the answer after it."""
    budget = prompt.thinking_budget if isinstance(prompt, Conversation) else None
    if not prepared.reasoning_end:
        return None
    return Thinking(prepared.reasoning_end, budget=budget, grammar=constraint)


def watch_disconnect(engine: Engine, admitted: Admitted, request: Request) -> asyncio.Task[None]:
    """A task that aborts the request as soon as its client goes away (cancel it when the
    response is done). It waits on the ASGI channel itself, so the abort is immediate."""

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        if not admitted.stream.finished:
            admitted.ended_early("client_disconnected")
            engine.abort(admitted.stream.request_id)

    return asyncio.create_task(watch())


async def stop_watching(watcher: asyncio.Task[None]) -> None:
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


def usage_info(usage: Usage) -> UsageInfo:
    return UsageInfo(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=usage.cached_tokens),
        completion_tokens_details=CompletionTokensDetails(reasoning_tokens=usage.reasoning_tokens),
    )


def timings(usage: Usage) -> Timings | None:
    if usage.ttft_s is None:
        return None
    decode_s = usage.decode_s or 0.0
    generated = max(usage.completion_tokens - 1, 0)
    drafted = usage.draft_tokens
    return Timings(
        ttft_s=round(usage.ttft_s, 6),
        tokens_per_s=round(generated / decode_s, 3) if decode_s > 0 else 0.0,
        prompt_tokens_per_s=round(usage.prompt_tokens / usage.ttft_s, 3) if usage.ttft_s else None,
        draft_tokens=drafted or None,
        accepted_tokens=usage.accepted_tokens if drafted else None,
        acceptance_rate=round(usage.accepted_tokens / drafted, 4) if drafted else None,
    )


def token_text(model: ServedModel, token: int) -> str:
    return model.tokenizer.decode([token])
