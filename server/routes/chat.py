"""POST /v1/chat/completions."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from mlxserve.core.sampling import InvalidParameterError
from mlxserve.core.sequence import RequestOutput, TokenLogprob
from mlxserve.core.worker import ServedModel

from ..deps import ConfigDep, EngineDep, MetricsDep, require_api_key
from ..generation import admit, collect, finish_reason, timings, token_text, usage_info
from ..protocol import (
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionLogprob,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    ChoiceLogprobs,
    ChunkChoice,
    DeltaMessage,
    TopLogprob,
    new_id,
)
from ..streaming import event_stream

router = APIRouter(prefix="/v1", tags=["chat"], dependencies=[Depends(require_api_key)])


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

    messages = body.prompt_messages()

    def prompt(model: ServedModel) -> list[int]:
        try:
            return list(model.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        except Exception as exc:  # Jinja templates raise their own errors for bad input
            raise InvalidParameterError(
                "messages", f"the chat template rejected the messages: {exc}"
            ) from exc

    chars = sum(len(message["content"]) for message in messages)
    admitted = await admit(
        engine,
        config,
        body.model,
        body.to_sampling_params,
        prompt,
        prompt_chars=chars,
        metrics=metrics,
    )
    response_id = new_id("chatcmpl")
    if body.stream:
        started = False

        def to_choice(output: RequestOutput) -> ChunkChoice:
            nonlocal started
            delta = DeltaMessage(role=None if started else "assistant", content=output.text)
            started = True
            return ChunkChoice(
                delta=delta,
                finish_reason=finish_reason(output.finish_reason),
                logprobs=_chat_logprobs(admitted.model, list(output.logprobs)),
            )

        return await event_stream(
            engine,
            admitted,
            request,
            response_id=response_id,
            chunk=ChatCompletionChunk,
            to_choice=to_choice,
            include_usage=body.include_usage,
        )

    result = await collect(engine, admitted, request)
    assert result.usage is not None
    return ChatCompletionResponse(
        id=response_id,
        model=admitted.name,
        choices=[
            ChatCompletionChoice(
                message=ChatResponseMessage(content=result.text),
                finish_reason=finish_reason(result.finish_reason) or "stop",
                logprobs=_chat_logprobs(admitted.model, result.logprobs),
            )
        ],
        usage=usage_info(result.usage),
        timings=timings(result.usage),
    )
