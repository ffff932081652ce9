"""A limit on request body size, enforced before anything buffers the body."""

from __future__ import annotations

from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlxserve.server.errors import error_response

TOO_LARGE = 413
TOO_LARGE_CODE = "request_too_large"


def too_large_message(max_bytes: int) -> str:
    return f"the request body is larger than [server] max_request_bytes ({max_bytes} bytes)"


class BodyTooLargeError(HTTPException):
    """Raised from ``receive`` once a chunked body passes the limit; FastAPI lets an
    HTTPException through its body reading, so the error handlers answer 413."""

    code = TOO_LARGE_CODE

    def __init__(self, max_bytes: int) -> None:
        super().__init__(TOO_LARGE, too_large_message(max_bytes))


class BodyLimitMiddleware:
    """Answers 413 to a body over ``max_bytes``: at once when Content-Length says so, else as
    soon as the bytes read pass the limit (so no more than the limit is ever held).

    The connection stays open: the server reads and drops the rest of the body, so the
    client (still sending) reliably gets the 413 rather than a reset connection.
    """

    def __init__(
        self, app: ASGIApp, max_bytes: int, rejected: Callable[[int, str], None] | None = None
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.rejected = rejected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._declared_length(scope) > self.max_bytes:
            if self.rejected is not None:
                self.rejected(TOO_LARGE, TOO_LARGE_CODE)
            response = error_response(
                TOO_LARGE,
                too_large_message(self.max_bytes),
                code=TOO_LARGE_CODE,
                path=scope.get("path", ""),
            )
            await response(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLargeError(self.max_bytes)
            return message

        await self.app(scope, limited_receive, send)

    @staticmethod
    def _declared_length(scope: Scope) -> int:
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    return int(value)
                except ValueError:
                    return 0
        return 0
