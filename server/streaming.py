"""Server-sent events: a request's outputs as SSE, errors included, ending with [DONE]."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from mlxserve.core.engine import Engine
from mlxserve.core.errors import EngineUnavailableError
from mlxserve.core.sequence import RequestOutput

from .errors import GenerationError, RequestTimeoutError
from .generation import Admitted, outputs, stop_watching, timings, usage_info, watch_disconnect
from .protocol import error_body, sse

Item = TypeVar("Item")
Payload = BaseModel | dict[str, Any] | str

# What ends a stream that has begun, and the error code its last event carries.
STREAM_ERRORS: tuple[tuple[type[Exception], str], ...] = (
    (GenerationError, "generation_failed"),
    (RequestTimeoutError, "timeout"),
    (EngineUnavailableError, "engine_unavailable"),
)


def stream_error(exc: Exception) -> dict[str, Any] | None:
    """The error event for an exception that ends a stream (None: not one of those)."""
    for kind, code in STREAM_ERRORS:
        if isinstance(exc, kind):
            return error_body(str(exc), "server_error", code=code)
    return None


async def sse_response(
    source: AsyncIterator[Item], render: Callable[[Item], Iterable[Payload]]
) -> StreamingResponse:
    """Wait for the first item (so early errors get a proper status), then stream them all as
    server-sent events; an error after the start becomes an error event; ``[DONE]`` ends it."""
    first = await anext(source, None)

    async def events() -> AsyncIterator[str]:
        try:
            if first is not None:
                for payload in render(first):
                    yield sse(payload)
            async for item in source:
                for payload in render(item):
                    yield sse(payload)
        except Exception as exc:
            error = stream_error(exc)
            if error is None:
                raise
            yield sse(error)
        finally:
            await source.aclose()
        yield sse("[DONE]")

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
