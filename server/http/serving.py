"""uvicorn as mlxserve runs it: a graceful stop that lets running requests finish, and an
HTTP edge that slow or idle clients cannot exhaust (see connections.py)."""

from __future__ import annotations

import logging
import socket
from types import FrameType

import uvicorn
from fastapi import FastAPI

from mlxserve.core.engine.engine import Engine
from mlxserve.server.http.connections import (
    FD_RESERVE,
    ConnectionGuard,
    RepeatFilter,
    connection_plan,
    guarded_protocol,
)
from mlxserve.server.http.fdlimit import raise_fd_limit

log = logging.getLogger(__name__)

# Time after the grace period for the last events to reach clients before uvicorn cancels.
FLUSH_MARGIN_S = 5.0
# Log lines a client can make the server write again and again: once per interval at most.
REPEATED_LINES = {
    "asyncio": ("socket.accept() out of system resource",),
    "uvicorn.error": (
        "Invalid HTTP request received.",
        "Unsupported upgrade request.",
        "No supported WebSocket library detected.",
    ),
}


def _shown(limit: int) -> str:
    return "unlimited" if limit < 0 else str(limit)


class Server(uvicorn.Server):
    """On SIGTERM or Ctrl-C: refuse new requests (503), give running ones
    ``[server] shutdown_grace_s`` to finish, end the rest with an error, then stop (the
    engine keeps its prefix cache on the disk tier on the way out).

    Connections get ``[server] header_timeout_s`` to send their request headers and
    ``body_timeout_s`` for the body, and at most ``max_connections`` are open at once."""

    def __init__(self, app: FastAPI, *, host: str, port: int, log_level: str) -> None:
        self.engine: Engine = app.state.engine
        settings = app.state.config.server
        self.grace_s: float = settings.shutdown_grace_s
        before, soft, hard = raise_fd_limit()
        max_connections, backlog = connection_plan(settings.max_connections, soft)
        self.guard = ConnectionGuard(
            max_connections, settings.header_timeout_s, settings.body_timeout_s
        )
        app.state.metrics.registry.register(self.guard)
        raised = f"raised from {_shown(before)} to" if soft != before else "is"
        log.info(
            "open files: soft limit %s %s (hard limit %s); at most %d connections "
            "([server] max_connections), request headers within %g s (header_timeout_s)",
            raised,
            _shown(soft),
            _shown(hard),
            max_connections,
            settings.header_timeout_s,
        )
        if soft >= 0 and max_connections > soft - FD_RESERVE:
            log.warning(
                "[server] max_connections (%d) leaves less than %d of the %d open files for "
                "the server itself: expect 'Too many open files' with that many connections",
                max_connections,
                FD_RESERVE,
                soft,
            )
        super().__init__(
            uvicorn.Config(
                app,
                host=host,
                port=port,
                log_level=log_level,
                timeout_graceful_shutdown=int(self.grace_s + FLUSH_MARGIN_S),
                http=guarded_protocol(self.guard),
                ws="none",  # no WebSocket routes: Upgrade requests are plain HTTP
                backlog=backlog,
            )
        )
        for name, messages in REPEATED_LINES.items():
            logging.getLogger(name).addFilter(RepeatFilter(messages))

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.engine.error is not None:
            # The engine failed (or lost a rank) and exits by itself in a few seconds; until
            # then /health keeps saying why. The signal only makes sure that exit is coming.
            self.engine.exit_soon()
            return
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.engine.drain(self.grace_s)
        await super().shutdown(sockets)
