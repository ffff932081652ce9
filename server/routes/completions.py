"""POST /v1/completions: a raw prompt (text or token ids) continued, over the shared pipeline."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from functools import partial
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from mlxserve.core.engine.sequence import TokenLogprob, Usage
from mlxserve.core.engine.worker import ServedModel
from mlxserve.server.conversation import (
    Finished,
    PromptLogprobs,
    Reply,
    ScoredEvent,
    TextDelta,
    start,
)
from mlxserve.server.deps import ConfigDep, EngineDep, MetricsDep, require_api_key
from mlxserve.server.generation import timings, token_text, usage_info
from mlxserve.server.http.body import OffLoopJsonRoute
from mlxserve.server.protocol.openai import (
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    new_id,
)
from mlxserve.server.streaming import sse_response
from mlxserve.server.tokenizing import with_own_tokenizer

TextOf = Callable[[int], str]  # a token's text

router = APIRouter(
    prefix="/v1",
    tags=["completions"],
    dependencies=[Depends(require_api_key)],
    route_class=OffLoopJsonRoute,
)


def _text_of(model: ServedModel) -> TextOf:
    return lambda token: token_text(model, token)


def _top(text_of: TextOf, logprob: TokenLogprob) -> dict[str, float]:
    """The most likely tokens at a position, and (as OpenAI lists it too) the one chosen."""
    top = {text_of(t): p for t, p in logprob.top}
    top.setdefault(text_of(logprob.token_id), logprob.logprob)
    return top


def _legacy_logprobs(
    text_of: TextOf, logprobs: Sequence[TokenLogprob], offset: int = 0
) -> CompletionLogprobs | None:
    """Log probabilities in the legacy shape; ``offset`` is where the first token's text
    starts in the whole completion."""
    if not logprobs:
        return None
    tokens = [text_of(lp.token_id) for lp in logprobs]
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[lp.logprob for lp in logprobs],
        top_logprobs=[_top(text_of, lp) for lp in logprobs],
        text_offset=_offsets(tokens, offset),
    )


def _offsets(tokens: list[str], offset: int) -> list[int]:
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return offsets


@dataclass(frozen=True)
class Echo:
    """The prompt as a completion echoes it: its text, and its tokens' log probabilities
    (None unless asked for); ``end`` is where the text after it starts, counted the way
    ``text_offset`` counts (the prompt's tokens' texts end to end; 0 without logprobs)."""

    text: str
    logprobs: CompletionLogprobs | None
    end: int

    def joined(self, after: CompletionLogprobs | None) -> CompletionLogprobs | None:
        """The prompt's log probabilities followed by ``after``'s."""
        if self.logprobs is None or after is None:
            return self.logprobs or after
        return CompletionLogprobs(
            tokens=self.logprobs.tokens + after.tokens,
            token_logprobs=self.logprobs.token_logprobs + after.token_logprobs,
            top_logprobs=self.logprobs.top_logprobs + after.top_logprobs,
            text_offset=self.logprobs.text_offset + after.text_offset,
        )


def _echo(
    body: CompletionRequest,
    ids: Sequence[int],
    scored: tuple[TokenLogprob, ...] | None,
    tokenizer: Any,
) -> Echo:
    """The echo of the request's prompt (``ids``); ``scored`` are its tokens' log
    probabilities from the second on (the first has none), when asked for."""
    text = body.prompt if isinstance(body.prompt, str) else tokenizer.decode(list(ids))
    if body.logprobs is None or scored is None:
        return Echo(text, None, 0)

    def text_of(token: int) -> str:
        return str(tokenizer.decode([token]))

    tokens = [text_of(token) for token in ids]
    logprobs = CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[None, *(lp.logprob for lp in scored)],
        top_logprobs=[None, *(_top(text_of, lp) for lp in scored)],
        text_offset=_offsets(tokens, 0),
    )
    return Echo(text, logprobs, sum(len(token) for token in tokens))


async def _echoed(
    body: CompletionRequest, reply: Reply, events: AsyncGenerator[ScoredEvent, None]
) -> AsyncGenerator[Echo | ScoredEvent, None]:
    """``events`` with the prompt's echo first (when asked for), built on a tokenizing
    thread: it is as long as the prompt, and the event loop does nothing that long."""
    echoing = body.echo
    ids = reply.admitted.prompt_ids
    async with aclosing(events):
        async for event in events:
            if echoing:
                echoing = False
                scored = event.logprobs if isinstance(event, PromptLogprobs) else None
                yield await with_own_tokenizer(
                    reply.admitted.model.tokenizer, partial(_echo, body, ids, scored)
                )
            if not isinstance(event, PromptLogprobs):
                yield event


@router.post("/completions", response_model=CompletionResponse)
async def completions(
    body: CompletionRequest,
    request: Request,
    engine: EngineDep,
    config: ConfigDep,
    metrics: MetricsDep,
) -> Any:
    """Continue a prompt (text or token ids), at once or streamed as server-sent events;
    with ``echo``, the prompt (scored, with ``logprobs``) comes first."""
    prompt, sampling = body.raw_prompt(), body.sampling()
    reply = await start(engine, config, body.model, prompt, sampling, request, metrics=metrics)
    model, response_id = reply.admitted.model, new_id("cmpl")

    def chunk(**fields: Any) -> CompletionChunk:
        return CompletionChunk(id=response_id, model=reply.model_name, **fields)

    events = _echoed(body, reply, reply.scored_events(engine))
    text_of = _text_of(model)
    if body.stream:
        offset = 0  # of the next text in the whole completion

        def render(event: Echo | ScoredEvent) -> list[BaseModel]:
            nonlocal offset
            if isinstance(event, Echo):
                offset = event.end
                return [chunk(choices=[CompletionChoice(text=event.text, logprobs=event.logprobs)])]
            if isinstance(event, TextDelta):
                logprobs = _legacy_logprobs(text_of, event.logprobs, offset)
                offset += len(event.text)
                return [chunk(choices=[CompletionChoice(text=event.text, logprobs=logprobs)])]
            assert isinstance(event, Finished)  # a raw prompt's reply has no tool calls
            ended: list[BaseModel] = [
                chunk(choices=[CompletionChoice(text="", finish_reason=event.reason)])
            ]
            if body.include_usage:
                usage, spent = usage_info(event.usage), timings(event.usage)
                ended.append(chunk(choices=[], usage=usage, timings=spent))
            return ended

        return await sse_response(events, render)

    text: list[str] = []
    logprobs: list[TokenLogprob] = []
    echo = Echo("", None, 0)
    finished = Finished("stop", Usage(prompt_tokens=0, completion_tokens=0))
    async for event in events:
        if isinstance(event, Echo):
            echo = event
        elif isinstance(event, TextDelta):
            text.append(event.text)
            logprobs.extend(event.logprobs)
        elif isinstance(event, Finished):
            finished = event
    return CompletionResponse(
        id=response_id,
        model=reply.model_name,
        choices=[
            CompletionChoice(
                text=echo.text + "".join(text),
                finish_reason=finished.reason,
                logprobs=echo.joined(_legacy_logprobs(text_of, logprobs, echo.end)),
            )
        ],
        usage=usage_info(finished.usage),
        timings=timings(finished.usage),
    )
