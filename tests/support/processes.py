"""Real processes for the process tests: the ``mlxserve`` command, and ``mlxserve launch``
serving one model on two ranks on loopback (mlx.launch, ring backend)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from .server import free_port, free_port_run, running_server, write_config

MLXSERVE = str(Path(sys.executable).parent / "mlxserve")
PROMPTS = [[5, 9, 77, 120, 33, 8, 250, 19], [42] * 40, list(range(3, 70))]


def wait_until_healthy(url: str, process: subprocess.Popen, timeout: float = 60) -> None:
    """Wait for a server process to answer 200 on /health; fail with its output if it dies."""
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, process.stdout.read() if process.stdout else ""
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"{url} did not become healthy in {timeout:g} s"
        time.sleep(0.2)


def completion(url: str, prompt: list[int], max_tokens: int = 24) -> str:
    """The greedy text of a token-id prompt, from the server at ``url``."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    response = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def two_ranks_config(
    tmp: Path,
    checkpoint: Path,
    distributed: str,
    hosts: Sequence[str] = ("127.0.0.1", "127.0.0.1"),
) -> str:
    """A config serving ``checkpoint`` as model "m" on two ranks on 127.0.0.1 (or one rank per
    entry of ``hosts``); ``distributed`` is appended to its [distributed] table."""
    return (
        f'[registry]\ndefault_model = "m"\ncache_dir = "{tmp / "cache"}"\n'
        f'[models.m]\nsource = "{checkpoint}"\n'
        f"[distributed]\nhosts = {json.dumps(list(hosts))}\n"
        f"starting_port = {free_port_run()}\n{distributed}"
    )


@contextmanager
def launched(
    tmp: Path, text: str, extra_env: dict[str, str] | None = None
) -> Iterator[tuple[str, subprocess.Popen]]:
    """``mlxserve launch`` with the config ``text`` (a [server] port is added); yields its URL
    once healthy and the process; ends the whole process group after."""
    port = free_port()
    (tmp / "mlxserve.toml").write_text(text + f"\n[server]\nport = {port}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLXSERVE_", "MLX_"))}
    env.update(extra_env or {})
    process = subprocess.Popen(
        [MLXSERVE, "launch", "--config", str(tmp / "mlxserve.toml")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, process, 90)
        yield url, process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def single_rank_texts(
    tmp: Path,
    checkpoint: Path,
    prompts: list[list[int]] = PROMPTS,
    max_tokens: int = 24,
    extra: str = "",
) -> list[str]:
    """What one rank (an in-thread server) answers to ``prompts``: the reference for ranks."""
    config = write_config(
        tmp,
        f'[registry]\ndefault_model = "m"\ncache_dir = "{tmp}/c"\n'
        f'[models.m]\nsource = "{checkpoint}"\n{extra}',
    )
    with running_server(config) as server:
        return [completion(server.url, p, max_tokens) for p in prompts]


@dataclass
class Served:
    """A running ``mlxserve serve``: its URL, process and log file."""

    url: str
    port: int
    process: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        return self.process.poll() is None


@contextmanager
def served(
    tmp: Path,
    checkpoint: Path,
    server: str = "",
    extra: str = "",
    preexec_fn: Callable[[], None] | None = None,
    registry: str = "",
    model: str = "",
) -> Iterator[Served]:
    """``mlxserve serve`` of one tiny model named "m" on a free loopback port, healthy, its
    output in ``tmp/server.log``; ``server``, ``registry`` and ``model`` add lines to
    ``[server]``, ``[registry]`` and ``[models.m]``, ``extra`` tables.
    Stopped with SIGTERM (then killed) on the way out."""
    port = free_port()
    config = tmp / "mlxserve.toml"
    config.write_text(
        f'[registry]\ndefault_model = "m"\ncache_dir = "{tmp / "cache"}"\n{registry}\n'
        f'[models.m]\nsource = "{checkpoint}"\n{model}\n[server]\nport = {port}\n{server}\n{extra}'
    )
    log = tmp / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLXSERVE_", "MLX_"))}
    with log.open("w") as out:
        process = subprocess.Popen(
            [MLXSERVE, "serve", "--config", str(config)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=preexec_fn,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_until_healthy(url, process, 60)
        except AssertionError:
            raise AssertionError(log.read_text()[-3000:]) from None
        yield Served(url, port, process, log)
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def rank_pids(rank: int, tmp: Path, variable: str = "MLX_RANK") -> list[int]:
    """The processes launched as rank ``rank`` (told by ``variable``: mpirun's is
    ``OMPI_COMM_WORLD_RANK``) with the config in ``tmp``."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        ours = str(tmp).encode() in cmdline and b"mlxserve.server.cli.main" in cmdline
        if ours and f"{variable}={rank}".encode() in environ:
            pids.append(int(proc.name))
    return pids


def run_on_two_ranks(
    argv: list[str], env: dict[str, str] | None = None, timeout: float = 60
) -> str:
    """Run ``argv`` as two ranks under mlx.launch (ring, loopback); its stderr. A hung rank
    ends the whole group at ``timeout``, never left behind."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MLXSERVE_", "MLX_"))}
    launch = Path(sys.executable).parent / "mlx.launch"
    ranks = subprocess.Popen(
        [str(launch), "-n", "2", "--backend", "ring", "--starting-port", str(free_port_run()),
         "--", *argv],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**clean, **(env or {})}, start_new_session=True,
    )  # fmt: skip
    try:
        _, stderr = ranks.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(ranks.pid, signal.SIGKILL)
        _, stderr = ranks.communicate()
    return str(stderr)
