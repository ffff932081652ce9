"""Request bodies are parsed off the event loop once they are large: a body of
``max_request_bytes`` takes a noticeable time to parse, and no other request should wait."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

# Below this a body parses in well under a millisecond: not worth a thread.
PARSE_IN_THREAD_BYTES = 64 * 1024


class OffLoopJsonRequest(Request):
    """A request whose large JSON body is parsed in a worker thread."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            if len(body) > PARSE_IN_THREAD_BYTES:
                self._json = await asyncio.to_thread(json.loads, body)
            else:
                self._json = json.loads(body)
        return self._json


class OffLoopJsonRoute(APIRoute):
    """A route whose request body is parsed by :class:`OffLoopJsonRequest`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def off_loop(request: Request) -> Response:
            return await handler(OffLoopJsonRequest(request.scope, request.receive))

        return off_loop
