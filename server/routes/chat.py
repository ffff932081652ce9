"""POST /v1/chat/completions, with tool calls and structured output."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from mlxserve.core.engine.sequence import TokenLogprob, Usage
from mlxserve.core.engine.worker import ServedModel
from mlxserve.server.conversation import (
    Event,
    Finished,
    ReasoningDelta,
    TextDelta,
    ToolCallEvent,
    start,
)
from mlxserve.server.deps import ConfigDep, EngineDep, MetricsDep, require_api_key
from mlxserve.server.generation import timings, token_text, usage_info
from mlxserve.server.http.body import OffLoopJsonRoute
from mlxserve.server.protocol.openai import (
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionLogprob,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    ChoiceLogprobs,
    ChunkChoice,
    DeltaMessage,
    DeltaToolCall,
    ResponseFunctionCall,
    ResponseToolCall,
    TopLogprob,
    new_id,
)
from mlxserve.server.streaming import sse_response

router = APIRouter(
    prefix="/v1",
    tags=["chat"],
    dependencies=[Depends(require_api_key)],
    route_class=OffLoopJsonRoute,
)


def _chat_logprobs(model: ServedModel, logprobs: list[TokenLogprob]) -> ChoiceLogprobs | None:
    if not logprobs:
        return None

    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = token_text(model, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return ChoiceLogprobs(
        content=[
            ChatCompletionLogprob(
                **entry(lp.token_id, lp.logprob),
                top_logprobs=[TopLogprob(**entry(t, p)) for t, p in lp.top],
            )
            for lp in logprobs
        ]
    )


@router.post("/chat/completions", response_model=ChatCompletionResponse)
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    engine: EngineDep,
    config: ConfigDep,
    metrics: MetricsDep,
) -> Any:
    """Answer a conversation, at once or streamed as server-sent events."""
    conversation, sampling = body.conversation(), body.sampling()
    reply = await start(
        engine, config, body.model, conversation, sampling, request, metrics=metrics
    )
    model, response_id = reply.admitted.model, new_id("chatcmpl")

    def chunk(**fields: Any) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=response_id, model=reply.model_name, **fields)

    if body.stream:
        started = False

        def delta(**fields: Any) -> DeltaMessage:
            nonlocal started
            role: Literal["assistant"] | None = None if started else "assistant"
            started = True
            return DeltaMessage(role=role, **fields)

        def render(event: Event) -> list[BaseModel]:
            if isinstance(event, ReasoningDelta):
                return [chunk(choices=[ChunkChoice(delta=delta(reasoning_content=event.text))])]
            if isinstance(event, TextDelta):
                logprobs = _chat_logprobs(model, list(event.logprobs))
                return [
                    chunk(choices=[ChunkChoice(delta=delta(content=event.text), logprobs=logprobs)])
                ]
            if isinstance(event, ToolCallEvent):
                opening = DeltaToolCall(
                    index=event.index,
                    id=event.id,
                    type="function",
                    function=ResponseFunctionCall(name=event.name, arguments=""),
                )
                arguments = DeltaToolCall(
                    index=event.index, function=ResponseFunctionCall(arguments=event.arguments)
                )
                return [
                    chunk(choices=[ChunkChoice(delta=delta(tool_calls=[opening]))]),
                    chunk(choices=[ChunkChoice(delta=DeltaMessage(tool_calls=[arguments]))]),
                ]
            events: list[BaseModel] = [
                chunk(choices=[ChunkChoice(delta=delta(), finish_reason=event.reason)])
            ]
            if body.include_usage:
                usage, spent = usage_info(event.usage), timings(event.usage)
                events.append(chunk(choices=[], usage=usage, timings=spent))
            return events

        return await sse_response(reply.events(engine), render)

    text, reasoning, calls = [], [], []
    logprobs: list[TokenLogprob] = []
    finished = Finished("stop", Usage(prompt_tokens=0, completion_tokens=0))
    async for event in reply.events(engine):
        if isinstance(event, ReasoningDelta):
            reasoning.append(event.text)
        elif isinstance(event, TextDelta):
            text.append(event.text)
            logprobs.extend(event.logprobs)
        elif isinstance(event, ToolCallEvent):
            function = ResponseFunctionCall(name=event.name, arguments=event.arguments)
            calls.append(ResponseToolCall(id=event.id, function=function))
        else:
            finished = event
    content = "".join(text)
    message = ChatResponseMessage(
        content=content if content or not calls else None,
        reasoning_content="".join(reasoning) or None,
        tool_calls=calls or None,
    )
    return ChatCompletionResponse(
        id=response_id,
        model=reply.model_name,
        choices=[
            ChatCompletionChoice(
                message=message,
                finish_reason=finished.reason,
                logprobs=_chat_logprobs(model, logprobs),
            )
        ],
        usage=usage_info(finished.usage),
        timings=timings(finished.usage),
    )
