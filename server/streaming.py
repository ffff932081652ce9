"""Server-sent events: a request's outputs as SSE, errors included, ending with [DONE]."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from mlxserve.core.engine import Engine
from mlxserve.core.errors import EngineUnavailableError
from mlxserve.core.sequence import RequestOutput

from .errors import GenerationError, RequestTimeoutError
from .generation import Admitted, outputs, stop_watching, timings, usage_info, watch_disconnect
from .protocol import error_body, sse


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
    """Wait for the first output (so early errors get a proper status), then stream the rest.

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

    watcher = watch_disconnect(engine, admitted, request)
    source = outputs(engine, admitted)
    try:
        first = await anext(source, None)
    except BaseException:
        await stop_watching(watcher)
        raise

    async def events() -> AsyncIterator[str]:
        try:
            if first is not None:
                for event in to_events(first):
                    yield sse(event)
            async for output in source:
                for event in to_events(output):
                    yield sse(event)
        except GenerationError as exc:
            yield sse(error_body(str(exc), "server_error", code="generation_failed"))
        except RequestTimeoutError as exc:
            yield sse(error_body(str(exc), "server_error", code="timeout"))
        except EngineUnavailableError as exc:
            yield sse(error_body(str(exc), "server_error", code="engine_unavailable"))
        finally:
            await stop_watching(watcher)
            await source.aclose()
        yield sse("[DONE]")

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )
