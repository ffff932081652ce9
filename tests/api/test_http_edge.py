"""The HTTP edge on real servers in a thread: the connection guard's deadlines and eviction at
max_connections (on a tiny app), and a local server refuses other web sites' requests and
DNS-rebinding host names. (A real ``mlxserve serve`` under a slowloris attack:
process/test_slowloris.py; the edge's parts alone: unit/test_http_edge_parts.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from mlxserve.server.http.connections import (
    ConnectionGuard,
    guarded_protocol,
)

from ..support.server import free_port, running_server, write_config

# ---- the connection guard on a real uvicorn in a thread, with a tiny app -------------------


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
