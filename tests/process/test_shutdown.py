"""A real ``mlxserve serve`` process: graceful SIGTERM, and an engine failure that exits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from ..support.processes import MLXSERVE, wait_until_healthy
from ..support.server import free_port

# uvicorn ends by raising the signal it caught again, once it has shut down gracefully.
STOPPED_CLEANLY = (0, -signal.SIGTERM)
LONG_PROMPT = [(i * 37) % 250 + 3 for i in range(40)]
# Runs `mlxserve serve` with a fault injected into the engine loop once a flag file exists.
FAULTY_SERVE = """
import pathlib, sys
from mlxserve.core.engine.engine import Engine
from mlxserve.server.cli.main import main

flag, count_waiting = pathlib.Path(sys.argv[1]), Engine._count_waiting

def faulty(self):
    if flag.exists():
        raise RuntimeError("a bug in the engine loop")
    count_waiting(self)

Engine._count_waiting = faulty
sys.exit(main(["serve", "--config", sys.argv[2]]))
"""


def write_config(tmp: Path, checkpoint: Path, port: int, extra: str = "") -> Path:
    path = tmp / "mlxserve.toml"
    path.write_text(
        f'[registry]\ndefault_model = "m"\ncache_dir = "{tmp / "cache"}"\n'
        f'[models.m]\nsource = "{checkpoint}"\n'
        f"[server]\nport = {port}\nshutdown_grace_s = 3\n"
        f'[kv_cache]\ndisk_dir = "{tmp / "kv"}"\n{extra}'
    )
    return path


@contextmanager
def serving(command: list[str], port: int) -> Iterator[tuple[str, subprocess.Popen]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLXSERVE_", "MLX_"))}
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, process, 60)
        yield url, process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def stream_events(url: str, body: dict, events: list, started: threading.Event) -> None:
    body = {"model": "m", "temperature": 0, "ignore_eos": True, "stream": True, **body}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))
                started.set()


def test_sigterm_finishes_running_requests_ends_the_rest_and_keeps_the_prefix_cache(
    tmp_path: Path, tiny_checkpoints: dict[str, Path]
) -> None:
    port = free_port()
    config = write_config(tmp_path, tiny_checkpoints["llama"], port)
    with serving([MLXSERVE, "serve", "--config", str(config)], port) as (url, process):
        short, long = [], []
        short_started, long_started = threading.Event(), threading.Event()
        threads = [
            threading.Thread(
                target=stream_events,
                args=(url, {"prompt": LONG_PROMPT, "max_tokens": 4000}, long, long_started),
            ),
            threading.Thread(
                target=stream_events,
                args=(url, {"prompt": [5, 9, 77], "max_tokens": 400}, short, short_started),
            ),
        ]
        threads[0].start()
        assert long_started.wait(30)
        threads[1].start()
        assert short_started.wait(30)
        process.send_signal(signal.SIGTERM)
        events_before_the_signal = len(short)
        time.sleep(0.3)
        try:
            late = httpx.post(url + "/v1/completions", json={"prompt": "hi"}, timeout=5)
            assert late.status_code == 503, late.text
        except httpx.ConnectError:
            pass  # the listening socket is already closed: refused just as well
        for thread in threads:
            thread.join(30)
        assert process.wait(20) in STOPPED_CLEANLY, process.stdout.read()
    assert short[-1] == "[DONE]" and len(short) > events_before_the_signal + 2
    assert json.loads(short[-2])["choices"][0]["finish_reason"] == "length"
    assert long[-1] == "[DONE]"
    error = json.loads(long[-2])["error"]
    assert "shutting down" in error["message"]
    assert list((tmp_path / "kv").rglob("*.safetensors")), "the prefix cache was not kept"

    port = free_port()
    config = write_config(tmp_path, tiny_checkpoints["llama"], port)
    with serving([MLXSERVE, "serve", "--config", str(config)], port) as (url, process):
        body = {"model": "m", "prompt": LONG_PROMPT, "max_tokens": 1}
        warm = httpx.post(url + "/v1/completions", json=body, timeout=30).json()
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) in STOPPED_CLEANLY
    assert warm["usage"]["prompt_tokens_details"]["cached_tokens"] == 32


def test_an_engine_failure_exits_non_zero_and_signals_still_stop_it(
    tmp_path: Path, tiny_checkpoints: dict[str, Path]
) -> None:
    port, flag = free_port(), tmp_path / "fail-now"
    config = write_config(tmp_path, tiny_checkpoints["llama"], port)
    command = [sys.executable, "-c", FAULTY_SERVE, str(flag), str(config)]
    with serving(command, port) as (url, process):
        flag.touch()
        deadline = time.monotonic() + 10
        while httpx.get(url + "/health", timeout=2).status_code == 200:
            assert time.monotonic() < deadline, "/health never noticed the failure"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert process.wait(15) == 1
        assert time.monotonic() - started < 10
        assert "a bug in the engine loop" in process.stdout.read()
