"""Server-sent events: a request's outputs as SSE, errors included, ending with [DONE]."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from mlxserve.core.engine.engine import Engine
from mlxserve.core.engine.sequence import RequestOutput
from mlxserve.core.errors import EngineUnavailableError
from mlxserve.server.errors import GenerationError, OutputFormatError, RequestTimeoutError
from mlxserve.server.generation import (
    Admitted,
    outputs,
    stop_watching,
    timings,
    usage_info,
    watch_disconnect,
)
from mlxserve.server.protocol.openai import error_body, sse

Item = TypeVar("Item")
Payload = BaseModel | dict[str, Any] | str

# What ends a stream that has begun, and the error code its last event carries.
STREAM_ERRORS: tuple[tuple[type[Exception], str], ...] = (
    (OutputFormatError, "output_format_failed"),
    (GenerationError, "generation_failed"),
    (RequestTimeoutError, "timeout"),
    (EngineUnavailableError, "engine_unavailable"),
)


def stream_error_code(exc: Exception) -> str | None:
    """The error code of an exception that ends a stream (None: not one of those)."""
    return next((code for kind, code in STREAM_ERRORS if isinstance(exc, kind)), None)


def stream_error(exc: Exception) -> dict[str, Any] | None:
    """The error event for an exception that ends a stream (None: not one of those)."""
    code = stream_error_code(exc)
    kind = "invalid_request_error" if isinstance(exc, OutputFormatError) else "server_error"
    return None if code is None else error_body(str(exc), kind, code=code)


def typed_event(event: dict[str, Any]) -> str:
    """One server-sent event named by its ``type`` (the Responses and Messages APIs' framing)."""
    data = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    return f"event: {event['type']}\ndata: {data}\n\n"


def _openai_error(exc: Exception) -> list[Payload] | None:
    error = stream_error(exc)
    return None if error is None else [error]


async def sse_response(
    source: AsyncGenerator[Item, None],
    render: Callable[[Item], Iterable[Payload]],
    *,
    opening: Iterable[Payload] = (),
    on_error: Callable[[Exception], Iterable[Payload] | None] = _openai_error,
    frame: Callable[[Any], str] = sse,
    closing: str | None = "[DONE]",
) -> StreamingResponse:
    """Wait for the first item (so early errors get a proper status), then stream them all as
    server-sent events: ``opening``, each item's payloads, then ``closing``. An error after
    the start becomes the payloads ``on_error`` gives (None: not an error it knows)."""
    try:
        first = await anext(source, None)
    except BaseException:
        await source.aclose()
        raise

    async def events() -> AsyncIterator[str]:
        try:
            for payload in opening:
                yield frame(payload)
            if first is not None:
                for payload in render(first):
                    yield frame(payload)
            async for item in source:
                for payload in render(item):
                    yield frame(payload)
        except Exception as exc:
            payloads = on_error(exc)
            if payloads is None:
                raise
            for payload in payloads:
                yield frame(payload)
        finally:
            await source.aclose()
        if closing is not None:
            yield frame(closing)

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


async def event_stream(
    engine: Engine,
    admitted: Admitted,
    request: Request,
    *,
    response_id: str,
    chunk: type[BaseModel],
    to_choice: Callable[[RequestOutput], BaseModel],
    include_usage: bool,
) -> StreamingResponse:
    """A request's outputs as chunks of type ``chunk`` (one choice each, then usage).

    A client that goes away aborts the request at once, whether the stream has begun or not.
    """

    def to_events(output: RequestOutput) -> list[BaseModel]:
        events = [chunk(id=response_id, model=admitted.name, choices=[to_choice(output)])]
        if output.usage and include_usage:
            usage, spent = usage_info(output.usage), timings(output.usage)
            events.append(
                chunk(id=response_id, model=admitted.name, choices=[], usage=usage, timings=spent)
            )
        return events

    async def watched() -> AsyncIterator[RequestOutput]:
        watcher = watch_disconnect(engine, admitted, request)
        source = outputs(engine, admitted)
        try:
            async for output in source:
                yield output
        finally:
            await stop_watching(watcher)
            await source.aclose()

    return await sse_response(watched(), to_events)
