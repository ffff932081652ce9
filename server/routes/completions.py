"""POST /v1/completions: a raw prompt (text or token ids) continued, over the shared pipeline."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from mlxserve.core.engine.sequence import TokenLogprob, Usage
from mlxserve.core.engine.worker import ServedModel
from mlxserve.server.conversation import Event, Finished, TextDelta, start
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


def _legacy_logprobs(
    model: ServedModel, logprobs: list[TokenLogprob], offset: int = 0
) -> CompletionLogprobs | None:
    """Log probabilities in the legacy shape; ``offset`` is where the first token's text
    starts in the whole completion."""
    if not logprobs:
        return None
    tokens = [token_text(model, lp.token_id) for lp in logprobs]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[lp.logprob for lp in logprobs],
        top_logprobs=[{token_text(model, t): p for t, p in lp.top} for lp in logprobs],
        text_offset=offsets,
    )


@router.post("/completions", response_model=CompletionResponse)
async def completions(
    body: CompletionRequest,
    request: Request,
    engine: EngineDep,
    config: ConfigDep,
    metrics: MetricsDep,
) -> Any:
    """Continue a prompt (text or token ids), at once or streamed as server-sent events."""
    prompt, sampling = body.raw_prompt(), body.sampling()
    reply = await start(engine, config, body.model, prompt, sampling, request, metrics=metrics)
    model, response_id = reply.admitted.model, new_id("cmpl")

    def chunk(**fields: Any) -> CompletionChunk:
        return CompletionChunk(id=response_id, model=reply.model_name, **fields)

    if body.stream:
        offset = 0  # of the next text in the whole completion

        def render(event: Event) -> list[BaseModel]:
            nonlocal offset
            if isinstance(event, TextDelta):
                logprobs = _legacy_logprobs(model, list(event.logprobs), offset)
                offset += len(event.text)
                return [chunk(choices=[CompletionChoice(text=event.text, logprobs=logprobs)])]
            assert isinstance(event, Finished)  # a raw prompt's reply has no tool calls
            ended = CompletionChoice(text="", finish_reason=event.reason)
            events: list[BaseModel] = [chunk(choices=[ended])]
            if body.include_usage:
                usage, spent = usage_info(event.usage), timings(event.usage)
                events.append(chunk(choices=[], usage=usage, timings=spent))
            return events

        return await sse_response(reply.events(engine), render)

    text: list[str] = []
    logprobs: list[TokenLogprob] = []
    finished = Finished("stop", Usage(prompt_tokens=0, completion_tokens=0))
    async for event in reply.events(engine):
        if isinstance(event, TextDelta):
            text.append(event.text)
            logprobs.extend(event.logprobs)
        elif isinstance(event, Finished):
            finished = event
    return CompletionResponse(
        id=response_id,
        model=reply.model_name,
        choices=[
            CompletionChoice(
                text="".join(text),
                finish_reason=finished.reason,
                logprobs=_legacy_logprobs(model, logprobs),
            )
        ],
        usage=usage_info(finished.usage),
        timings=timings(finished.usage),
    )
