"""Server-sent events: a reply's events as SSE, errors included, ending with [DONE]."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from typing import Any, TypeVar

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from mlxserve.server.errors import stream_error_kind
from mlxserve.server.protocol.openai import error_body, sse

Item = TypeVar("Item")
Payload = BaseModel | dict[str, Any] | str


def stream_error(exc: Exception) -> dict[str, Any] | None:
    """The OpenAI-shaped error event for an exception that ends a stream (None: not one)."""
    kind = stream_error_kind(exc)
    return None if kind is None else error_body(str(exc), kind.type, code=kind.code)


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
