"""uvicorn as mlxserve runs it: a graceful stop that lets running requests finish."""

from __future__ import annotations

import socket
from types import FrameType

import uvicorn
from fastapi import FastAPI

from mlxserve.core.engine import Engine

# Time after the grace period for the last events to reach clients before uvicorn cancels.
FLUSH_MARGIN_S = 5.0


class Server(uvicorn.Server):
    """On SIGTERM or Ctrl-C: refuse new requests (503), give running ones
    ``[server] shutdown_grace_s`` to finish, end the rest with an error, then stop (the
    engine keeps its prefix cache on the disk tier on the way out)."""

    def __init__(self, app: FastAPI, *, host: str, port: int, log_level: str) -> None:
        self.engine: Engine = app.state.engine
        self.grace_s: float = app.state.config.server.shutdown_grace_s
        super().__init__(
            uvicorn.Config(
                app,
                host=host,
                port=port,
                log_level=log_level,
                timeout_graceful_shutdown=int(self.grace_s + FLUSH_MARGIN_S),
            )
        )

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
