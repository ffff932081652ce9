"""A fake Hugging Face hub on 127.0.0.1: just enough of the API for ``snapshot_download``.

Each repo is a folder on disk, served at one fixed commit (``main`` or that commit's sha).
The hub can fail its first requests with 503, to exercise retries.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

_API = re.compile(r"/api/models/(?P<repo>[^/]+/[^/]+)(?:/(?P<kind>revision|tree)/(?P<rev>[^/?]+))?")
_RESOLVE = re.compile(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)")


def commit_of(repo_id: str) -> str:
    """The (fake) commit sha a repo is served at."""
    return hashlib.sha1(repo_id.encode()).hexdigest()


class FakeHub:
    """A threaded HTTP server serving ``repos`` (repo id -> folder); use as a context manager."""

    def __init__(self, repos: dict[str, Path], *, fail_first: int = 0) -> None:
        self.repos = repos
        self.fail_first = fail_first
        self.requests: list[str] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def record(self, line: str, *, counts: bool) -> bool:
        """Log a request; whether to fail it (one of the first ``fail_first`` that count)."""
        with self._lock:
            self.requests.append(line)
            if counts and self.fail_first > 0:
                self.fail_first -= 1
                return True
            return False


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._serve(body=True)

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _serve(self, *, body: bool) -> None:
            path = self.path.split("?", 1)[0]
            api, resolve = _API.fullmatch(path), _RESOLVE.fullmatch(path)
            match = api or resolve
            if hub.record(f"{self.command} {path}", counts=match is not None):
                return self._reply(503, b"busy", body=body)
            if match is None:  # e.g. huggingface_hub's best-effort telemetry
                return self._reply(404, b"", body=body)
            if match["repo"] not in hub.repos:
                return self._reply(404, b"", {"X-Error-Code": "RepoNotFound"}, body=body)
            repo = match["repo"]
            if match["rev"] not in (None, "main", commit_of(repo)):
                return self._reply(404, b"", {"X-Error-Code": "RevisionNotFound"}, body=body)
            if resolve:
                return self._file(repo, resolve["file"], body=body)
            if api["kind"] == "tree":
                return self._json(_tree(hub, repo), body=body)
            siblings = [{"rfilename": e["path"]} for e in _tree(hub, repo)]
            return self._json({"id": repo, "sha": commit_of(repo), "siblings": siblings}, body=body)

        def _file(self, repo: str, name: str, *, body: bool) -> None:
            file = hub.repos[repo] / name
            headers = {"X-Repo-Commit": commit_of(repo)}
            if not file.is_file():
                headers["X-Error-Code"] = "EntryNotFound"
                return self._reply(404, b"", headers, body=body)
            data = file.read_bytes()
            headers["ETag"] = f'"{hashlib.sha256(data).hexdigest()}"'
            return self._reply(200, data, headers, body=body)

        def _json(self, data: Any, *, body: bool) -> None:
            headers = {"Content-Type": "application/json"}
            return self._reply(200, json.dumps(data).encode(), headers, body=body)

        def _reply(
            self, status: int, data: bytes, headers: dict[str, str] | None = None, *, body: bool
        ) -> None:
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

    return Handler


def _tree(hub: FakeHub, repo: str) -> list[dict[str, Any]]:
    root = hub.repos[repo]
    return [
        {
            "type": "file",
            "path": file.relative_to(root).as_posix(),
            "size": file.stat().st_size,
            "oid": hashlib.sha1(file.read_bytes()).hexdigest(),
        }
        for file in sorted(root.rglob("*"))
        if file.is_file()
    ]
