"""Server-sent events: a request's outputs as SSE, errors included, ending with [DONE]."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import StreamingResponse

from mlxserve.core.engine import Engine
from mlxserve.core.sequence import RequestOutput

from .errors import GenerationError, RequestTimeoutError
from .generation import Admitted, outputs
from .protocol import error_body, sse

ChunkMaker = Callable[[RequestOutput], list[object]]


async def event_stream(
    engine: Engine, admitted: Admitted, request: Request, to_events: ChunkMaker
) -> StreamingResponse:
    """Wait for the first output (so early errors get a proper status), then stream the rest.

    Once streaming, Starlette notices a client that goes away and cancels the stream, which
    aborts the request; before that, ``outputs`` watches for it.
    """
    admitted.watch = request
    source = outputs(engine, admitted)
    first = await anext(source, None)
    admitted.watch = None

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
        finally:
            await source.aclose()
        yield sse("[DONE]")

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )
