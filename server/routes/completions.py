"""POST /v1/completions: a raw prompt (text or token ids) continued, over the shared pipeline."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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

router = APIRouter(
    prefix="/v1",
    tags=["completions"],
    dependencies=[Depends(require_api_key)],
    route_class=OffLoopJsonRoute,
)


def _top(model: ServedModel, logprob: TokenLogprob) -> dict[str, float]:
    """The most likely tokens at a position, and (as OpenAI lists it too) the one chosen."""
    top = {token_text(model, t): p for t, p in logprob.top}
    top.setdefault(token_text(model, logprob.token_id), logprob.logprob)
    return top


def _legacy_logprobs(
    model: ServedModel, logprobs: Sequence[TokenLogprob], offset: int = 0
) -> CompletionLogprobs | None:
    """Log probabilities in the legacy shape; ``offset`` is where the first token's text
    starts in the whole completion."""
    if not logprobs:
        return None
    tokens = [token_text(model, lp.token_id) for lp in logprobs]
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[lp.logprob for lp in logprobs],
        top_logprobs=[_top(model, lp) for lp in logprobs],
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


def _echo(body: CompletionRequest, reply: Reply, scored: tuple[TokenLogprob, ...] | None) -> Echo:
    """The echo of the request's prompt; ``scored`` are its tokens' log probabilities from
    the second on (the first has none), when asked for."""
    model, ids = reply.admitted.model, reply.admitted.prompt_ids
    text = body.prompt if isinstance(body.prompt, str) else model.tokenizer.decode(list(ids))
    if body.logprobs is None or scored is None:
        return Echo(text, None, 0)
    tokens = [token_text(model, token) for token in ids]
    end = sum(len(token) for token in tokens)
    logprobs = CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[None, *(lp.logprob for lp in scored)],
        top_logprobs=[None, *(_top(model, lp) for lp in scored)],
        text_offset=_offsets(tokens, 0),
    )
    return Echo(text, logprobs, end)


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

    if body.stream:
        offset = 0  # of the next text in the whole completion
        echoing = body.echo

        def render(event: ScoredEvent) -> list[BaseModel]:
            nonlocal offset, echoing
            events: list[BaseModel] = []
            if echoing:
                echoing = False
                scored = event.logprobs if isinstance(event, PromptLogprobs) else None
                echo = _echo(body, reply, scored)
                offset = echo.end
                echoed = CompletionChoice(text=echo.text, logprobs=echo.logprobs)
                events.append(chunk(choices=[echoed]))
            if isinstance(event, PromptLogprobs):
                return events
            if isinstance(event, TextDelta):
                logprobs = _legacy_logprobs(model, event.logprobs, offset)
                offset += len(event.text)
                return [
                    *events,
                    chunk(choices=[CompletionChoice(text=event.text, logprobs=logprobs)]),
                ]
            assert isinstance(event, Finished)  # a raw prompt's reply has no tool calls
            ended = CompletionChoice(text="", finish_reason=event.reason)
            events.append(chunk(choices=[ended]))
            if body.include_usage:
                usage, spent = usage_info(event.usage), timings(event.usage)
                events.append(chunk(choices=[], usage=usage, timings=spent))
            return events

        return await sse_response(reply.scored_events(engine), render)

    text: list[str] = []
    logprobs: list[TokenLogprob] = []
    scored: tuple[TokenLogprob, ...] | None = None
    finished = Finished("stop", Usage(prompt_tokens=0, completion_tokens=0))
    async for event in reply.scored_events(engine):
        if isinstance(event, PromptLogprobs):
            scored = event.logprobs
        elif isinstance(event, TextDelta):
            text.append(event.text)
            logprobs.extend(event.logprobs)
        elif isinstance(event, Finished):
            finished = event
    echo = _echo(body, reply, scored) if body.echo else Echo("", None, 0)
    return CompletionResponse(
        id=response_id,
        model=reply.model_name,
        choices=[
            CompletionChoice(
                text=echo.text + "".join(text),
                finish_reason=finished.reason,
                logprobs=echo.joined(_legacy_logprobs(model, logprobs, echo.end)),
            )
        ],
        usage=usage_info(finished.usage),
        timings=timings(finished.usage),
    )
