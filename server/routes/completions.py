"""POST /v1/completions."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from mlxserve.core.engine.sequence import RequestOutput, TokenLogprob
from mlxserve.core.engine.worker import ServedModel
from mlxserve.server.deps import ConfigDep, EngineDep, MetricsDep, require_api_key
from mlxserve.server.generation import (
    admit,
    collect,
    finish_reason,
    timings,
    token_text,
    usage_info,
)
from mlxserve.server.http.body import OffLoopJsonRoute
from mlxserve.server.protocol.openai import (
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    new_id,
)
from mlxserve.server.streaming import event_stream
from mlxserve.server.structured import grammar_for_response_format

router = APIRouter(
    prefix="/v1",
    tags=["completions"],
    dependencies=[Depends(require_api_key)],
    route_class=OffLoopJsonRoute,
)


def _legacy_logprobs(
    model: ServedModel, logprobs: list[TokenLogprob], offset: int = 0
) -> CompletionLogprobs | None:
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

    def prompt(model: ServedModel, tokenizer: Any) -> list[int]:
        if isinstance(body.prompt, str):
            return list(tokenizer.encode(body.prompt))
        return body.prompt

    chars = len(body.prompt) if isinstance(body.prompt, str) else 0
    admitted = await admit(
        engine,
        config,
        body.model,
        body.to_sampling_params,
        prompt,
        prompt_chars=chars,
        metrics=metrics,
        grammar=lambda model, tokenizer: grammar_for_response_format(body.response_format),
    )
    response_id = new_id("cmpl")
    if body.stream:
        offset = 0

        def to_choice(output: RequestOutput) -> CompletionChoice:
            nonlocal offset
            choice = CompletionChoice(
                text=output.text,
                finish_reason=finish_reason(output.finish_reason),
                logprobs=_legacy_logprobs(admitted.model, list(output.logprobs), offset),
            )
            offset += len(output.text)
            return choice

        return await event_stream(
            engine,
            admitted,
            request,
            response_id=response_id,
            chunk=CompletionChunk,
            to_choice=to_choice,
            include_usage=body.include_usage,
        )

    result = await collect(engine, admitted, request)
    assert result.usage is not None
    return CompletionResponse(
        id=response_id,
        model=admitted.name,
        choices=[
            CompletionChoice(
                text=result.text,
                finish_reason=finish_reason(result.finish_reason) or "stop",
                logprobs=_legacy_logprobs(admitted.model, result.logprobs),
            )
        ],
        usage=usage_info(result.usage),
        timings=timings(result.usage),
    )
