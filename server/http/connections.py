"""The HTTP edge's connections: a deadline for request headers and bodies, and a cap on how
many connections are open, so that idle or trickling clients cannot hold every file
descriptor (slowloris).

uvicorn has neither: a connection that never finishes its request headers stays open for
ever, and its keep-alive timer is cancelled by any byte received. ``guarded_protocol``
subclasses uvicorn's h11 protocol (pinned: the same parser whether or not httptools is
installed) with one deadline per phase of a connection:

- waiting for request headers (a new connection, or a kept-alive one between requests):
  ``[server] header_timeout_s`` from the start of the wait, however the bytes trickle in;
- reading the request body: ``[server] body_timeout_s`` from the end of the headers;
- running the request: none here (``[server] request_timeout_s`` bounds the work).

A connection past its deadline is closed. Beyond ``max_connections`` open connections a new
one closes the oldest connection still waiting for its request headers (else the oldest
still sending a request body); if every open connection is running a request, the new one
gets a 503 and is closed. So idle connections cannot lock anyone out: a new client only
needs to send its request faster than the attacker opens connections.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from typing import Any, cast

import h11
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from uvicorn.protocols.http.h11_impl import H11Protocol, RequestResponseCycle

from mlxserve.server.protocol.openai import error_body

log = logging.getLogger(__name__)

PREFIX = "mlxserve_"
SUMMARY_INTERVAL_S = 10.0
# Files, pipes and sockets the process keeps open besides client connections.
FD_RESERVE = 64
DEFAULT_MAX_CONNECTIONS = 1024
MAX_BACKLOG = 2048  # uvicorn's default
CLOSE_REASONS = ("header_timeout", "body_timeout", "evicted", "refused")


def connection_plan(configured: int | None, soft_limit: int) -> tuple[int, int]:
    """``(max_connections, backlog)`` for an open-files soft limit (-1: unlimited).

    By default at most 1024 connections, and never more than half of what the limit leaves
    after ``FD_RESERVE``. The other half is for connections accepted but not yet counted:
    the event loop accepts up to ``backlog`` connections at a time, and a connection is
    counted (and closed if there is no room) two loop iterations after it was accepted, so
    up to three batches can be open beyond the cap.
    """
    room = max(4 * 16, (1 << 20 if soft_limit < 0 else soft_limit) - FD_RESERVE)
    limit = configured or max(16, min(DEFAULT_MAX_CONNECTIONS, room // 2))
    return limit, max(16, min(MAX_BACKLOG, (room - limit) // 3))


class Summary:
    """Logs the first of a kind of event at once, then how many more came, at most once per
    ``interval`` s (so an attack cannot flood the log)."""

    def __init__(self, logger: logging.Logger, message: str, interval: float) -> None:
        self.logger, self.message, self.interval = logger, message, interval
        self.pending = 0
        self.flush: asyncio.TimerHandle | None = None

    def event(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.flush is not None:
            self.pending += 1
            return
        self.logger.warning(
            "%s (further ones are summed up every %g s)", self.message, self.interval
        )
        self.flush = loop.call_later(self.interval, self._flush, loop)

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        self.flush = None
        if self.pending:
            count, self.pending = self.pending, 0
            self.logger.warning("%s: %d more in the last %g s", self.message, count, self.interval)
            self.flush = loop.call_later(self.interval, self._flush, loop)


class ConnectionGuard:
    """What every connection of one server shares: the limits, the open connections (the
    ones still sending a request, oldest first), counters and log summaries."""

    def __init__(
        self, max_connections: int, header_timeout_s: float, body_timeout_s: float
    ) -> None:
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.body_timeout_s = body_timeout_s
        self.open: set[GuardedProtocol] = set()
        # Connections waiting for request headers, and sending a request body, each in
        # the order they started to (dicts keep insertion order): whom to close for room.
        self.waiting: dict[GuardedProtocol, None] = {}
        self.receiving: dict[GuardedProtocol, None] = {}
        self.closed = dict.fromkeys(CLOSE_REASONS, 0)
        limit = f"{max_connections} connections are open ([server] max_connections)"
        self.summaries = {
            "header_timeout": Summary(
                log,
                "closed a connection that sent no complete request headers within "
                f"[server] header_timeout_s ({header_timeout_s:g} s)",
                SUMMARY_INTERVAL_S,
            ),
            "body_timeout": Summary(
                log,
                "closed a connection whose request body did not arrive within "
                f"[server] body_timeout_s ({body_timeout_s:g} s)",
                SUMMARY_INTERVAL_S,
            ),
            "evicted": Summary(
                log,
                f"{limit}: closed the oldest one still sending its request to make room",
                SUMMARY_INTERVAL_S,
            ),
            "refused": Summary(
                log,
                f"{limit}, all running requests: refused a new one (503)",
                SUMMARY_INTERVAL_S,
            ),
        }

    def admit(self, connection: GuardedProtocol) -> bool:
        """Count a new connection in, making room if needed; False: refuse it."""
        if len(self.open) >= self.max_connections:
            oldest = next(iter(self.waiting), None) or next(iter(self.receiving), None)
            if oldest is None:
                self.count("refused", connection.loop)
                return False
            self.count("evicted", connection.loop)
            self.release(oldest)
            oldest.drop()
        self.open.add(connection)
        return True

    def release(self, connection: GuardedProtocol) -> None:
        self.open.discard(connection)
        self.waiting.pop(connection, None)
        self.receiving.pop(connection, None)

    def count(self, reason: str, loop: asyncio.AbstractEventLoop) -> None:
        self.closed[reason] += 1
        self.summaries[reason].event(loop)

    # ---- /metrics (a prometheus_client collector) -------------------------------------

    def describe(self) -> Iterator[Metric]:
        return self.collect()

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            PREFIX + "http_connections_open", "Open client connections.", value=len(self.open)
        )
        yield GaugeMetricFamily(
            PREFIX + "http_connections_max",
            "The most client connections kept open ([server] max_connections).",
            value=self.max_connections,
        )
        closed = CounterMetricFamily(
            PREFIX + "http_connections_closed",
            "Connections the server closed: header_timeout or body_timeout (too slow), "
            "evicted (the oldest one still sending its request, to make room for a new one at "
            "max_connections) or refused (a new one, with every open one running a request).",
            labels=["reason"],
        )
        for reason, count in self.closed.items():
            closed.add_metric([reason], count)
        yield closed


def _refusal() -> bytes:
    """The 503 a refused connection gets (written before its request is read)."""
    message = "too many open connections; retry shortly"
    body = json.dumps(error_body(message, "server_error", code="too_many_connections"))
    head = (
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nretry-after: 1\r\nconnection: close\r\n\r\n"
    )
    return (head + body).encode()


class GuardedProtocol(H11Protocol):
    """uvicorn's h11 protocol with the guard's deadlines and connection cap."""

    guard: ConnectionGuard  # set by guarded_protocol()
    refusal: bytes = b""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.phase = ""
        self.deadline: asyncio.TimerHandle | None = None

    # As uvicorn's own: narrower than asyncio.Protocol's (any BaseTransport), hence the ignore.
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if not self.guard.admit(self):
            self.transport.write(self.refusal)
            self.drop()
            return
        self._follow()

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.release(self)
        self._cancel_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow()

    def drop(self) -> None:
        """Close the connection now."""
        self._cancel_deadline()
        self.guard.release(self)
        if not self.transport.is_closing():
            self.transport.close()

    def _phase_now(self) -> str:
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            return "body"
        # None until the first request comes, though uvicorn's annotation does not say so
        cycle = cast("RequestResponseCycle | None", self.cycle)
        if state is h11.IDLE and (cycle is None or cycle.response_complete):
            return "headers"
        return "running"

    def _follow(self) -> None:
        """Start the deadline of the phase the connection is in, if it just entered it."""
        if self.transport.is_closing():
            return
        phase = self._phase_now()
        if phase == self.phase:
            return
        self.phase = phase
        self._cancel_deadline()
        guard = self.guard
        guard.waiting.pop(self, None)
        guard.receiving.pop(self, None)
        if phase == "headers":
            guard.waiting[self] = None
            self.deadline = self.loop.call_later(guard.header_timeout_s, self._too_slow, phase)
        elif phase == "body":
            guard.receiving[self] = None
            self.deadline = self.loop.call_later(guard.body_timeout_s, self._too_slow, phase)

    def _too_slow(self, phase: str) -> None:
        self.deadline = None
        if self.transport.is_closing():
            return
        self.guard.count("header_timeout" if phase == "headers" else "body_timeout", self.loop)
        self.drop()

    def _cancel_deadline(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None


def guarded_protocol(guard: ConnectionGuard) -> type[GuardedProtocol]:
    """The protocol class to give uvicorn (``http=``) for connections under ``guard``."""
    return type("GuardedH11Protocol", (GuardedProtocol,), {"guard": guard, "refusal": _refusal()})


class RepeatFilter(logging.Filter):
    """Lets a log message through at most once per ``interval`` s, saying how many like it
    were dropped in between (the event loop logs "socket.accept() out of system resource",
    with a traceback, for every failed accept: thousands a second once files run out)."""

    def __init__(self, messages: tuple[str, ...], interval: float = SUMMARY_INTERVAL_S) -> None:
        super().__init__()
        self.messages = messages
        self.interval = interval
        self.last: dict[str, float] = {}
        self.dropped: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        key = next((m for m in self.messages if m in text), None)
        if key is None:
            return True
        now = time.monotonic()
        if now - self.last.get(key, -self.interval) < self.interval:
            self.dropped[key] = self.dropped.get(key, 0) + 1
            return False
        self.last[key] = now
        dropped = self.dropped.pop(key, 0)
        if dropped:
            record.msg = f"{record.msg} ({dropped} more like it in the last {self.interval:g} s)"
        return True
