"""A real uvicorn server on loopback, in a thread, for the API tests."""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI

from mlxserve.core.config.schema import Config, load_config
from mlxserve.registry.plugins import Plugins
from mlxserve.server.app import create_app


@dataclass
class RunningServer:
    url: str
    app: FastAPI

    @property
    def engine(self):  # noqa: ANN201
        return self.app.state.engine


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Below Linux's ephemeral range (32768-60999): no client socket is ever given one of these.
RING_PORTS = range(20000, 32000)


def free_port_run(count: int = 8) -> int:
    """The first of ``count`` consecutive free ports, for the ring backend (rank i listens on
    ``starting_port + i``): an OS-chosen port's neighbours may be any client's."""
    rng = random.Random()
    for _ in range(200):
        start = rng.randrange(RING_PORTS.start, RING_PORTS.stop - count)
        try:
            for port in range(start, start + count):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return start
    raise RuntimeError(f"no {count} consecutive free ports in {RING_PORTS}")


def write_config(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "mlxserve.toml"
    path.write_text(text)
    return load_config(path, env={})


def every_family_config(
    tmp: Path, checkpoints: dict[str, Path], default: str, aliases: str = "", extra: str = ""
) -> str:
    """A config serving each tiny family's checkpoint under the family's name; ``aliases``
    (a TOML list's items) go to the default model, ``extra`` is appended."""
    models = "".join(
        f'[models.{family}]\nsource = "{path}"\n'
        + (f"aliases = [{aliases}]\n" if family == default and aliases else "")
        for family, path in checkpoints.items()
    )
    return (
        f'[registry]\ndefault_model = "{default}"\ncache_dir = "{tmp / "cache"}"\n'
        f"max_loaded_models = {len(checkpoints)}\n{models}{extra}"
    )


@contextmanager
def running_server(config: Config, plugins: Plugins | None = None) -> Iterator[RunningServer]:
    app = create_app(config, plugins=plugins)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield RunningServer(url, app)
    finally:
        server.should_exit = True
        thread.join(30)


def wait_until(condition, timeout: float = 10.0) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def get(server: RunningServer, path: str, **kwargs: object) -> httpx.Response:
    return httpx.get(server.url + path, timeout=30, **kwargs)


def post(server: RunningServer, path: str, **kwargs: object) -> httpx.Response:
    return httpx.post(server.url + path, timeout=60, **kwargs)
