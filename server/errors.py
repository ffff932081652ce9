"""Every error the API returns, in OpenAI's shape: ``{"error": {message, type, param, code}}``,
or on Anthropic's Messages API in its own: ``{"type": "error", "error": {type, message}}``."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NamedTuple, TypeVar, cast

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from mlxserve.core.errors import (
    ContextLengthError,
    EngineUnavailableError,
    HubUnavailableError,
    ModelBusyError,
    ModelNotFoundError,
    QueueFullError,
    UnknownModelTypeError,
    UnsupportedModelError,
)
from mlxserve.core.logs import RateLimitedLog
from mlxserve.core.sampling.params import InvalidParameterError
from mlxserve.server.protocol.anthropic import anthropic_error_body, context_error_message
from mlxserve.server.protocol.openai import error_body

log = logging.getLogger(__name__)
# One line for every refused request (4xx), at most a few a second.
REJECTIONS = RateLimitedLog(log)


class RequestTimeoutError(Exception):
    """A request took longer than ``[server] request_timeout_s``."""


class GenerationError(Exception):
    """The engine ended a request with an error (the server goes on serving the others)."""


class OutputFormatError(GenerationError):
    """The request's own grammar (response_format, forced tool call) could not go on while
    decoding, e.g. past llguidance's limits on a step's work: the request's fault, a 400."""


class AuthError(Exception):
    """Missing or wrong API key."""


def error_response(
    status: int,
    message: str,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
    *,
    path: str = "",
) -> JSONResponse:
    """An error response, shaped for the API ``path`` belongs to."""
    if anthropic_shaped(path):
        return JSONResponse(anthropic_error_body(status, message), status, headers=headers)
    return JSONResponse(error_body(message, type, param, code), status, headers=headers)


def anthropic_shaped(path: str) -> bool:
    """Whether ``path`` is Anthropic's Messages API, whose errors have Anthropic's shape."""
    return path == "/v1/messages" or path.startswith("/v1/messages/")


class ErrorKind(NamedTuple):
    """How the API reports one kind of error: HTTP status, error type and code."""

    status: int
    type: str
    code: str | None


# The one error table: exception class -> how an error response (or, for the errors that can
# end a stream that has begun, the stream's last event) reports it. First match wins.
_MAPPED: dict[type[Exception], ErrorKind] = {
    ModelNotFoundError: ErrorKind(404, "invalid_request_error", "model_not_found"),
    ContextLengthError: ErrorKind(400, "invalid_request_error", "context_length_exceeded"),
    QueueFullError: ErrorKind(429, "rate_limit_error", "queue_full"),
    EngineUnavailableError: ErrorKind(503, "server_error", "engine_unavailable"),
    HubUnavailableError: ErrorKind(503, "server_error", "hub_unavailable"),
    UnknownModelTypeError: ErrorKind(422, "invalid_request_error", "model_unsupported"),
    UnsupportedModelError: ErrorKind(422, "invalid_request_error", "model_unsupported"),
    ModelBusyError: ErrorKind(409, "invalid_request_error", "model_busy"),
    RequestTimeoutError: ErrorKind(504, "server_error", "timeout"),
    OutputFormatError: ErrorKind(400, "invalid_request_error", "output_format_failed"),
    GenerationError: ErrorKind(500, "server_error", "generation_failed"),
    AuthError: ErrorKind(401, "invalid_request_error", "invalid_api_key"),
}
# What can end a stream that has begun (reading the engine's outputs); anything else raised
# after the stream's start is a bug, and ends the connection.
_ENDS_A_STREAM = (OutputFormatError, GenerationError, RequestTimeoutError, EngineUnavailableError)


def _kind_of(exc: Exception) -> ErrorKind:
    return next(kind for cls, kind in _MAPPED.items() if isinstance(exc, cls))


def stream_error_kind(exc: Exception) -> ErrorKind | None:
    """How the last event of a stream that ``exc`` ended reports it (None: ``exc`` is not
    one of the errors that end a stream); the same status, type and code as a response."""
    return _kind_of(exc) if isinstance(exc, _ENDS_A_STREAM) else None


def _rejected(
    request: Request,
    status: int,
    message: str,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.http_error(status, code or type)
    request_id = request.headers.get("x-request-id", "")[:64] or f"req_{uuid.uuid4().hex[:16]}"
    if status < 500:  # the 500s log their traceback
        shown = message if len(message) <= 300 else message[:300] + "…"
        REJECTIONS.info(
            "%s %s %s: %d %s: %s",
            request_id,
            request.method,
            request.url.path,
            status,
            code or type,
            shown,
        )
    headers = {**(headers or {}), "x-request-id": request_id}
    return error_response(status, message, type, param, code, headers, path=request.url.path)


@contextmanager
def renamed_params(renames: Mapping[str, str]) -> Iterator[None]:
    """Let an InvalidParameterError raised inside name its field as the API calls it."""
    try:
        yield
    except InvalidParameterError as exc:
        if exc.param not in renames:
            raise
        message = str(exc).removeprefix(f"{exc.param}: ")
        raise InvalidParameterError(renames[exc.param], message) from None


def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first: Mapping[str, Any] = (
        exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    )
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return _rejected(request, 400, f"the request body is not valid JSON: {first['msg']}")
    param = ".".join(loc) or None
    message = first.get("msg", "invalid request")
    return _rejected(request, 400, f"{param}: {message}" if param else message, param=param)


def _invalid_parameter(request: Request, exc: InvalidParameterError) -> JSONResponse:
    return _rejected(request, 400, str(exc), param=exc.param)


def _mapped(request: Request, exc: Exception) -> JSONResponse:
    status, kind, code = _kind_of(exc)
    headers = {"Retry-After": "1"} if status == 429 else None
    message = str(exc)
    if isinstance(exc, ContextLengthError) and anthropic_shaped(request.url.path):
        message = context_error_message(exc)
    return _rejected(request, status, message, kind, code=code, headers=headers)


def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    code = getattr(exc, "code", None)
    return _rejected(
        request, exc.status_code, str(exc.detail), kind, code=code, headers=exc.headers
    )


def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    message = f"internal error ({type(exc).__name__}); the server's log has the details"
    return _rejected(request, 500, message, "server_error")


E = TypeVar("E", bound=Exception)


def _handle(
    app: FastAPI, exc_class: type[E], handler: Callable[[Request, E], JSONResponse]
) -> None:
    """``handler`` answers ``exc_class``. Starlette types every handler as taking any
    Exception; it calls each with an instance of its class, as this signature checks."""
    app.add_exception_handler(exc_class, cast("Callable[[Request, Exception], Any]", handler))


def install_error_handlers(app: FastAPI) -> None:
    _handle(app, RequestValidationError, _validation_error)
    _handle(app, InvalidParameterError, _invalid_parameter)
    for exc_class in _MAPPED:
        _handle(app, exc_class, _mapped)
    _handle(app, HTTPException, _http_error)
    _handle(app, Exception, _unexpected)
