"""The HTTP edge: slow or idle connections cannot exhaust the server (slowloris), and a local
server refuses other web sites' requests and DNS-rebinding host names."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import resource
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn

from mlxserve.core.config.schema import ConfigError, load_config
from mlxserve.server.http.connections import (
    ConnectionGuard,
    RepeatFilter,
    connection_plan,
    guarded_protocol,
)

from .server import free_port, running_server, wait_until_healthy, write_config

MLXSERVE = str(Path(sys.executable).parent / "mlxserve")
CHILD_FD_LIMIT = 512  # the attacked server's open-files limit: small, so the attack is cheap
ATTACK_CONNECTIONS = 700  # more than that limit
HEADER_TIMEOUT_S = 2.0
HEALTH_BOUND_S = 2.0  # /health answers within this during the attack


# ---- a real `mlxserve serve` under a slowloris attack --------------------------------------


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
    port = free_port()
    config = tmp / "mlxserve.toml"
    config.write_text(
        f'[registry]\ndefault_model = "m"\ncache_dir = "{tmp / "cache"}"\n'
        f'[models.m]\nsource = "{tiny_checkpoints["llama"]}"\n'
        f"[server]\nport = {port}\nheader_timeout_s = {HEADER_TIMEOUT_S}\nbody_timeout_s = 3\n"
    )
    log = tmp / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLXSERVE_", "MLX_"))}
    with log.open("w") as out:
        process = subprocess.Popen(
            [MLXSERVE, "serve", "--config", str(config)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=low_fd_limit,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_until_healthy(url, process, 60)
        except AssertionError:
            raise AssertionError(log.read_text()[-3000:]) from None
        yield url, port, process, log
    finally:
        process.kill()
        process.wait(10)


def test_idle_connections_cannot_exhaust_the_server(attacked) -> None:
    url, port, process, log = attacked
    text = log.read_text()
    # The fd limit was raised at start (mlx_lm did not lower or break it), and said so.
    assert "open files: soft limit raised from 256 to 512 (hard limit 512)" in text, text
    max_connections = connection_plan(None, CHILD_FD_LIMIT)[0]
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
            assert fds is None or fds <= max_connections + 64, fds
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
    # a few summaries and the access log of the requests above; no line per connection
    assert len(new_lines) < 60, "\n".join(new_lines[:80])
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


# ---- the connection guard in-process, with a tiny app ---------------------------------------


async def echo_app(scope, receive, send) -> None:  # noqa: ANN001
    """Reads the body; /slow?S sleeps S seconds before answering."""
    assert scope["type"] == "http"
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        more = message.get("more_body", False)
    if scope["path"] == "/slow":
        await asyncio.sleep(float(scope["query_string"] or 1))
    headers = [(b"content-length", b"2")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"ok"})


@contextlib.contextmanager
def guarded(max_connections: int = 16, header_s: float = 0.5, body_s: float = 0.8):
    guard = ConnectionGuard(max_connections, header_s, body_s)
    port = free_port()
    config = uvicorn.Config(
        echo_app,
        host="127.0.0.1",
        port=port,
        http=guarded_protocol(guard),
        ws="none",
        lifespan="off",
        log_level="warning",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.02)
    try:
        yield guard, port
    finally:
        server.should_exit = True
        thread.join(10)


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    return sock


def response(sock: socket.socket) -> bytes:
    """One whole response (the test app's are small and carry Content-Length or close)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = re.search(rb"(?i)content-length: (\d+)", head)
    while length and len(body) < int(length[1]):
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def wait_closed(sock: socket.socket, within: float) -> float:
    began = time.monotonic()
    sock.settimeout(within)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        raise AssertionError(f"not closed within {within} s") from None
    except OSError:
        pass
    return time.monotonic() - began


def test_a_running_request_has_no_header_deadline_and_keep_alive_waits_do() -> None:
    with guarded(header_s=0.5) as (guard, port), connect(port) as sock:
        sock.sendall(b"GET /slow?1.2 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert response(sock).startswith(b"HTTP/1.1 200")  # ran 1.2 s > header_timeout_s
        time.sleep(0.2)
        sock.sendall(b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\n")  # the same connection
        assert response(sock).startswith(b"HTTP/1.1 200")
        idle = wait_closed(sock, 3)  # idle between requests: the header deadline again
        assert idle < 1.0, idle
        assert guard.closed["header_timeout"] == 1


def test_at_max_connections_the_oldest_idle_one_makes_room_else_503() -> None:
    with guarded(max_connections=3, header_s=5) as (guard, port):
        idle = [connect(port) for _ in range(3)]
        time.sleep(0.2)
        with connect(port) as fresh:
            fresh.sendall(b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\n")
            assert response(fresh).startswith(b"HTTP/1.1 200")
            wait_closed(idle[0], 2)  # the oldest idle one was closed for it
        busy = []
        for sock in idle[1:]:
            sock.sendall(b"GET /slow?2 HTTP/1.1\r\nHost: x\r\n\r\n")
            busy.append(sock)
        busy.append(connect(port))
        busy[-1].sendall(b"GET /slow?2 HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.3)
        with connect(port) as refused:
            answer = response(refused)
        assert answer.startswith(b"HTTP/1.1 503"), answer
        error = json.loads(answer.partition(b"\r\n\r\n")[2])["error"]
        assert error["code"] == "too_many_connections"
        for sock in busy:
            assert response(sock).startswith(b"HTTP/1.1 200")
            sock.close()
        for sock in idle:
            sock.close()
        assert guard.closed["evicted"] == 1 and guard.closed["refused"] == 1


def test_at_max_connections_idle_ones_go_first_then_unfinished_bodies() -> None:
    with guarded(max_connections=2, header_s=5, body_s=5) as (guard, port):
        sending = connect(port)
        sending.sendall(b"POST /fast HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        time.sleep(0.1)
        idle = connect(port)
        time.sleep(0.1)
        running = connect(port)  # closes the idle one, though the sending one is older
        running.sendall(b"GET /slow?1 HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_closed(idle, 2)
        time.sleep(0.1)
        with connect(port) as fresh:  # nobody idle: closes the one still sending its body
            wait_closed(sending, 2)
            fresh.sendall(b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\n")
            assert response(fresh).startswith(b"HTTP/1.1 200")
        assert response(running).startswith(b"HTTP/1.1 200")
        for sock in (sending, idle, running):
            sock.close()
        assert guard.closed["evicted"] == 2


def test_the_default_cap_leaves_room_for_the_server_and_for_bursts() -> None:
    assert connection_plan(None, 20000) == (1024, 2048)
    assert connection_plan(None, 512) == (224, 74)
    assert connection_plan(None, -1) == (1024, 2048)  # unlimited
    assert connection_plan(50, 512) == (50, 132)
    assert connection_plan(5000, 512) == (5000, 16)


def test_a_repeated_log_line_is_let_through_once_per_interval() -> None:
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger("mlxserve.test_http_edge")
    logger.propagate = False
    handler = Keep()
    logger.addHandler(handler)
    repeat = RepeatFilter(("socket.accept() out of system resource",), interval=0.3)
    logger.addFilter(repeat)
    try:
        for _ in range(5000):
            logger.error("socket.accept() out of system resource\nsocket: <fd=6>")
        logger.error("something else")
        time.sleep(0.35)
        logger.error("socket.accept() out of system resource\nsocket: <fd=6>")
    finally:
        logger.removeFilter(repeat)
        logger.removeHandler(handler)
    assert len(records) == 3, records
    assert "(4999 more like it in the last 0.3 s)" in records[2]


# ---- Host names and cross-site requests ----------------------------------------------------


def small_config(tmp_path: Path, checkpoint: Path, server: str = ""):  # noqa: ANN201
    return write_config(
        tmp_path,
        f'[registry]\ndefault_model = "m"\ncache_dir = "{tmp_path / "cache"}"\n'
        f'[models.m]\nsource = "{checkpoint}"\n[server]\n{server}',
    )


def error_of(response: httpx.Response, code: str) -> str:
    assert response.status_code == 403, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"} and error["code"] == code
    return error["message"]


COMPLETION = {"model": "m", "prompt": [5, 9], "max_tokens": 2}


def test_a_loopback_server_answers_only_loopback_host_names(tmp_path: Path, tiny_checkpoints):
    config = small_config(tmp_path, tiny_checkpoints["llama"])
    with running_server(config) as srv:
        port = srv.url.rsplit(":", 1)[1]
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "127.9.9.9"):
            assert httpx.get(srv.url + "/v1/models", headers={"Host": host}).status_code == 200
        for host in (f"rebind.example:{port}", "evil.test", "127.0.0.1.evil.test", "[::2]"):
            refused = httpx.get(srv.url + "/v1/models", headers={"Host": host})
            assert "allowed_hosts" in error_of(refused, "host_not_allowed"), host
        rebind = {"Host": f"rebind.example:{port}"}
        refused = httpx.post(srv.url + "/v1/completions", json=COMPLETION, headers=rebind)
        error_of(refused, "host_not_allowed")
        anthropic = httpx.post(srv.url + "/v1/messages", json={}, headers=rebind)
        assert anthropic.status_code == 403
        assert anthropic.json()["type"] == "error"
        assert anthropic.json()["error"]["type"] == "permission_error"
        metrics = httpx.get(srv.url + "/metrics").text
        assert 'http_errors_total{code="host_not_allowed",status="403"}' in metrics


def test_cross_site_requests_cannot_change_state(tmp_path: Path, tiny_checkpoints):
    config = small_config(tmp_path, tiny_checkpoints["llama"], 'cors_origins = ["http://ok.test"]')
    with running_server(config) as srv:
        unload = srv.url + "/admin/models/m/unload"
        evil = {"Origin": "http://evil.test"}
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        # the form a web page elsewhere can submit: refused, the model stays loaded
        error_of(httpx.post(unload, headers={**evil, **form}), "cross_origin_request")
        error_of(httpx.post(unload, content=b"a=b", headers=form), "unsupported_content_type")
        for kind in ("text/plain", "multipart/form-data; boundary=x"):
            refused = httpx.post(
                srv.url + "/v1/completions",
                content=json.dumps(COMPLETION),
                headers={"Content-Type": kind},
            )
            assert "JSON" in error_of(refused, "unsupported_content_type")
        refused = httpx.post(srv.url + "/v1/completions", json=COMPLETION, headers=evil)
        assert "evil.test" in error_of(refused, "cross_origin_request")
        sneaky = {"Sec-Fetch-Site": "cross-site"}
        error_of(httpx.post(unload, headers=sneaky), "cross_origin_request")
        null = httpx.post(srv.url + "/v1/completions", json=COMPLETION, headers={"Origin": "null"})
        error_of(null, "cross_origin_request")
        anthropic = httpx.post(srv.url + "/v1/messages", json={}, headers=evil)
        assert anthropic.status_code == 403 and anthropic.json()["type"] == "error"
        assert httpx.get(srv.url + "/admin/models").json()["data"][0]["id"] == "m"
        # reads stay open to every origin (without CORS headers, a page cannot read them)
        read = httpx.get(srv.url + "/v1/models", headers=evil)
        assert read.status_code == 200 and "access-control-allow-origin" not in read.headers
        # the server's own pages, the configured origins, and programs (no Origin) may
        port = srv.url.rsplit(":", 1)[1]
        for origin, host in [
            (srv.url, None),
            (f"http://localhost:{port}", f"localhost:{port}"),
            ("http://ok.test", None),
            (None, None),
        ]:
            headers = {"Origin": origin} if origin else {}
            headers |= {"Host": host} if host else {}
            ok = httpx.post(srv.url + "/v1/completions", json=COMPLETION, headers=headers)
            assert ok.status_code == 200, (origin, ok.text)
        # another loopback name is another origin
        other = {"Origin": f"http://localhost:{port}"}
        error_of(httpx.post(unload, json={}, headers=other), "cross_origin_request")
        own = {"Origin": srv.url, "Sec-Fetch-Site": "same-origin"}
        assert httpx.post(unload, headers=own).status_code == 200
        assert httpx.post(srv.url + "/admin/models/m/load").status_code == 200


def test_allowed_hosts_widens_or_opens_the_host_check(tmp_path: Path, tiny_checkpoints):
    def status(config, host: str) -> int:  # noqa: ANN001
        with running_server(config) as srv:
            return httpx.get(srv.url + "/v1/models", headers={"Host": host}).status_code

    checkpoint = tiny_checkpoints["llama"]
    listed = small_config(tmp_path, checkpoint, 'allowed_hosts = ["llm.lan", "*.box.test"]')
    with running_server(listed) as srv:
        for host, expected in [
            ("llm.lan:8100", 200),
            ("LLM.lan.", 200),
            ("a.b.box.test", 200),
            ("box.test", 403),
            ("other.lan", 403),
            ("localhost", 200),
        ]:
            got = httpx.get(srv.url + "/v1/models", headers={"Host": host}).status_code
            assert got == expected, host
    assert status(small_config(tmp_path, checkpoint, 'allowed_hosts = ["*"]'), "any.test") == 200
    # bound to every interface: every name, unless allowed_hosts lists some
    assert status(small_config(tmp_path, checkpoint, 'host = "0.0.0.0"'), "any.test") == 200
    both = 'host = "0.0.0.0"\nallowed_hosts = ["llm.lan"]'
    assert status(small_config(tmp_path, checkpoint, both), "any.test") == 403


# ---- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("allowed_hosts = ['http://x.test']", "server.allowed_hosts[0]: 'http://x.test' must be"),
        ("allowed_hosts = ['ok.test', 'x.test:80']", "server.allowed_hosts[1]: 'x.test:80'"),
        ("allowed_hosts = ['a b']", "server.allowed_hosts[0]: 'a b' must be a host name"),
        ("allowed_hosts = 'x.test'", "server.allowed_hosts: must be a list (got 'x.test')"),
        ("header_timeout_s = 0", "server.header_timeout_s: must be greater than 0 (got 0"),
        ("body_timeout_s = -1", "server.body_timeout_s: must be greater than 0 (got -1"),
        ("max_connections = 0", "server.max_connections: must be at least 1 (got 0)"),
        ("max_connections = true", "server.max_connections: must be an integer (got true)"),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "mlxserve.toml"
    path.write_text(f"[server]\n{text}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value).startswith(f"{path}: {expected}"), str(info.value)


def test_config_keys_and_environment() -> None:
    server = load_config(env={}).server
    assert server.allowed_hosts == [] and server.max_connections is None
    assert (server.header_timeout_s, server.body_timeout_s) == (10.0, 60.0)
    env = {
        "MLXSERVE_SERVER__ALLOWED_HOSTS": '["llm.lan", "[::1]", "10.0.0.2", "*"]',
        "MLXSERVE_SERVER__MAX_CONNECTIONS": "300",
        "MLXSERVE_SERVER__HEADER_TIMEOUT_S": "2.5",
    }
    server = load_config(env=env).server
    assert server.allowed_hosts == ["llm.lan", "[::1]", "10.0.0.2", "*"]
    assert (server.max_connections, server.header_timeout_s) == (300, 2.5)
    with pytest.raises(ConfigError, match="^MLXSERVE_SERVER__MAX_CONNECTIONS: server.max_conn"):
        load_config(env={"MLXSERVE_SERVER__MAX_CONNECTIONS": "0"})
