"""Server-sent events: a reply's events as SSE, errors included, ending with [DONE]."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from typing import Any, TypeVar

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from mlxserve.server.errors import stream_error_kind
from mlxserve.server.protocol.openai import error_body, sse

Item = TypeVar("Item")
Payload = BaseModel | dict[str, Any] | str
# How long a stream waits for its first item before it starts anyway (a long prompt's prefill
# outlasts a client's timeout for the response's headers), then how often it says it is alive.
FIRST_ITEM_WAIT_S = 5.0
KEEPALIVE_S = 10.0
KEEPALIVE = ": keep-alive\n\n"  # an SSE comment: every client skips it


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
    keepalive: str = KEEPALIVE,
) -> StreamingResponse:
    """Stream a reply's items as server-sent events: ``opening``, each item's payloads, then
    ``closing``. The first item is waited for up to FIRST_ITEM_WAIT_S, so that an early error
    gets its own status; past that the stream starts anyway, with ``keepalive`` every
    KEEPALIVE_S until the first item comes. An error after the start becomes the payloads
    ``on_error`` gives (None: not an error it knows)."""
    first = asyncio.ensure_future(anext(source, None))
    try:
        await asyncio.wait({first}, timeout=FIRST_ITEM_WAIT_S)
        if first.done() and first.exception() is not None:
            first.result()
    except BaseException:
        await _close(first, source)
        raise

    async def events() -> AsyncIterator[str]:
        try:
            for payload in opening:
                yield frame(payload)
            while not first.done():
                await asyncio.wait({first}, timeout=KEEPALIVE_S)
                if not first.done():
                    yield keepalive
            item = first.result()
            if item is not None:
                for payload in render(item):
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
            await _close(first, source)
        if closing is not None:
            yield frame(closing)

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


async def _close(first: asyncio.Future[Any], source: AsyncGenerator[Any, None]) -> None:
    """Stop waiting for the first item (its request ends with it), then close ``source``."""
    if not first.done():
        first.cancel()
        await asyncio.wait({first})
    await source.aclose()
