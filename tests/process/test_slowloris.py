"""A real ``mlxserve serve`` (with a small open-files limit) under a slowloris attack: hundreds
of idle connections and trickled headers and bodies cannot exhaust it; /health answers all
along, each connection is cut at its deadline, and the log stays short."""

from __future__ import annotations

import contextlib
import os
import re
import resource
import select
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from mlxserve.server.http.connections import FD_RESERVE, connection_plan

from ..support.processes import served

CHILD_FD_LIMIT = 512  # the attacked server's open-files limit: small, so the attack is cheap
ATTACK_CONNECTIONS = 700  # more than that limit
HEADER_TIMEOUT_S = 2.0
HEALTH_BOUND_S = 2.0  # /health answers within this during the attack


def low_fd_limit() -> None:  # runs in the child before exec
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, CHILD_FD_LIMIT))


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def idle_connections(port: int, count: int, chunk: int = 25) -> list[socket.socket]:
    """``count`` connections that start a request and never finish its headers, opened
    ``chunk`` at a time as fast as the server takes them in."""
    sockets: list[socket.socket] = []
    while len(sockets) < count:
        new = []
        for _ in range(min(chunk, count - len(sockets))):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
            new.append(sock)
        waiting, deadline = list(new), time.monotonic() + 3
        while waiting and time.monotonic() < deadline:
            connected = select.select([], waiting, [], 0.5)[1]
            for sock in connected:
                with contextlib.suppress(OSError):
                    sock.send(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                waiting.remove(sock)
        sockets += new
    return sockets


def closed_by_server(sock: socket.socket) -> bool:
    try:
        while True:
            if not sock.recv(65536):
                return True  # end of stream (after a 503, if it got one)
    except BlockingIOError:
        return False
    except OSError:
        return True  # reset, or never connected


@pytest.fixture(scope="module")
def attacked(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoints: dict[str, Path]):
    tmp = tmp_path_factory.mktemp("edge")
    limits = f"header_timeout_s = {HEADER_TIMEOUT_S}\nbody_timeout_s = 3"
    with served(tmp, tiny_checkpoints["llama"], limits, preexec_fn=low_fd_limit) as server:
        yield server.url, server.port, server.process, server.log


def test_idle_connections_cannot_exhaust_the_server(attacked) -> None:
    url, port, process, log = attacked
    text = log.read_text()
    # The fd limit was raised at start (mlx_lm did not lower or break it), and said so.
    assert "open files: soft limit raised from 256 to 512 (hard limit 512)" in text, text
    max_connections, backlog = connection_plan(None, CHILD_FD_LIMIT)
    # Accepted connections are counted (and the extra ones closed) a loop iteration or two
    # after the accept, so up to three backlogs may be open past the cap: by design, still
    # short of the limit. (max_connections + 64 failed on a loaded CI machine: 347 fds.)
    most_fds = max_connections + 3 * backlog + FD_RESERVE
    assert f"at most {max_connections} connections" in text
    lines_before = len(text.splitlines())

    sockets: list[socket.socket] = []
    attack = threading.Thread(
        target=lambda: sockets.extend(idle_connections(port, ATTACK_CONNECTIONS))
    )
    started = time.monotonic()
    attack.start()
    try:
        latencies = []
        while attack.is_alive() or time.monotonic() - started < HEADER_TIMEOUT_S * 0.75:
            asked = time.monotonic()
            assert httpx.get(url + "/health", timeout=HEALTH_BOUND_S).status_code == 200
            latencies.append(time.monotonic() - asked)
            fds = open_fds(process.pid)
            assert fds is None or fds <= most_fds <= CHILD_FD_LIMIT, fds
            time.sleep(0.05)
        attack.join()
        attack_s = time.monotonic() - started
        # Every idle connection is closed by header_timeout_s (the oldest ones sooner, to
        # make room for new ones at max_connections).
        deadline = time.monotonic() + HEADER_TIMEOUT_S + 3
        open_ones = list(sockets)
        while open_ones and time.monotonic() < deadline:
            time.sleep(0.2)
            open_ones = [sock for sock in open_ones if not closed_by_server(sock)]
        assert not open_ones, f"{len(open_ones)} idle connections still open"
    finally:
        attack.join()
        for sock in sockets:
            sock.close()
    body = {"model": "m", "prompt": [5, 9, 77], "max_tokens": 3}
    assert httpx.post(url + "/v1/completions", json=body, timeout=30).status_code == 200
    metrics = httpx.get(url + "/metrics", timeout=5).text
    for reason in ("header_timeout", "evicted"):
        found = re.search(rf'http_connections_closed_total{{reason="{reason}"}} (\S+)', metrics)
        assert found and float(found[1]) > 0, reason
    text = log.read_text()
    assert "Too many open files" not in text and "out of system resource" not in text
    new_lines = text.splitlines()[lines_before:]
    # a few summaries and the access log of the requests above; no line per connection (700)
    assert len(new_lines) < 200, "\n".join(new_lines[:80])
    print(
        f"{len(sockets)} idle connections in {attack_s:.1f} s; /health answered "
        f"{len(latencies)} times, slowest {max(latencies):.3f} s"
    )


def test_trickled_headers_and_bodies_are_cut_at_their_deadline(attacked) -> None:
    url, port, process, log = attacked

    def trickle(start: bytes, then: bytes, give_up_s: float) -> float:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(start)
            began = time.monotonic()
            while time.monotonic() - began < give_up_s:
                try:
                    sock.sendall(then)
                except OSError:
                    break
                if select.select([sock], [], [], 0.3)[0]:
                    try:
                        if not sock.recv(65536):
                            break
                    except OSError:
                        break
            return time.monotonic() - began

    header_cut = trickle(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n", b"X-A: b\r\n", 10)
    assert HEADER_TIMEOUT_S - 0.5 < header_cut < HEADER_TIMEOUT_S + 1.5, header_cut
    start = (
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n{"
    )
    body_cut = trickle(start, b" ", 10)
    assert 2.5 < body_cut < 4.5, body_cut
    assert httpx.get(url + "/health", timeout=5).status_code == 200
    assert "Traceback" not in log.read_text()
