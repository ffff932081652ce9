"""Two real ranks on loopback (mlx.launch, ring backend), started by ``mlxserve launch``."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from .server import free_port, running_server, write_config

MLXSERVE = str(Path(sys.executable).parent / "mlxserve")
PROMPTS = [[5, 9, 77, 120, 33, 8, 250, 19], [42] * 40, list(range(3, 70))]
FAMILIES = ["llama", "qwen", "mistral", "deepseek"]


def completion(url: str, prompt: list[int], max_tokens: int = 24) -> str:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    response = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def config_text(tmp: Path, checkpoint: Path, distributed: str) -> str:
    return (
        f'[registry]\ndefault_model = "m"\ncache_dir = "{tmp / "cache"}"\n'
        f'[models.m]\nsource = "{checkpoint}"\n'
        f'[distributed]\nhosts = ["127.0.0.1", "127.0.0.1"]\n'
        f"starting_port = {free_port()}\n{distributed}"
    )


@contextmanager
def launched(tmp: Path, text: str) -> Iterator[tuple[str, subprocess.Popen]]:
    port = free_port()
    (tmp / "mlxserve.toml").write_text(text + f"\n[server]\nport = {port}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLXSERVE_", "MLX_"))}
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
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the ranks did not start"
            time.sleep(0.3)
        yield url, process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def single_rank_texts(tmp: Path, checkpoint: Path) -> list[str]:
    config = write_config(
        tmp,
        f'[registry]\ndefault_model = "m"\ncache_dir = "{tmp}/c"\n'
        f'[models.m]\nsource = "{checkpoint}"\n',
    )
    with running_server(config) as server:
        return [completion(server.url, p) for p in PROMPTS]


@pytest.mark.parametrize("family", FAMILIES)
def test_two_pipeline_ranks_equal_one(family: str, tmp_path: Path, tiny_checkpoints) -> None:
    expected = single_rank_texts(tmp_path, tiny_checkpoints[family])
    text = config_text(tmp_path, tiny_checkpoints[family], 'strategy = "pipeline"\n')
    with launched(tmp_path, text) as (url, _):
        health = httpx.get(url + "/health").json()
        stages = health["placement"]["m"]["stages"]
        assert [s["layers"] for s in stages] == [[2, 3], [0, 1]]
        assert [completion(url, p) for p in PROMPTS] == expected
        body = {"prompt": PROMPTS[2], "max_tokens": 24, "temperature": 0, "ignore_eos": True}
        again = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
        cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached == (0 if family == "mistral" else 64)  # each rank kept its own blocks
        assert again["choices"][0]["text"] == expected[2]


@pytest.mark.parametrize("family", ["llama", "qwen"])
def test_tensor_parallel_equals_one_rank(family: str, tmp_path: Path, tiny_checkpoints) -> None:
    expected = single_rank_texts(tmp_path, tiny_checkpoints[family])
    text = config_text(tmp_path, tiny_checkpoints[family], 'strategy = "tensor"\n')
    with launched(tmp_path, text) as (url, _):
        assert httpx.get(url + "/health").json()["placement"]["m"]["strategy"] == "tensor"
        assert [completion(url, p) for p in PROMPTS] == expected


def test_unequal_memory_gives_an_uneven_split(tmp_path: Path, tiny_checkpoints) -> None:
    text = config_text(
        tmp_path, tiny_checkpoints["llama"], 'split = "memory"\nmemory_limit_mb = [3, 1]\n'
    )
    with launched(tmp_path, text) as (url, _):
        stages = httpx.get(url + "/health").json()["placement"]["m"]["stages"]
        assert [s["layers"] for s in stages] == [[1, 3], [0, 0]]
        assert stages[0]["bytes"] == 3 * stages[1]["bytes"]


def rank_pids(rank: int, tmp: Path) -> list[int]:
    """The processes of rank ``rank`` launched with the config in ``tmp``."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        ours = str(tmp).encode() in cmdline and b"mlxserve.server.cli" in cmdline
        if ours and f"MLX_RANK={rank}".encode() in environ:
            pids.append(int(proc.name))
    return pids


def test_a_killed_rank_is_reported_not_hung_on(tmp_path: Path, tiny_checkpoints) -> None:
    text = config_text(tmp_path, tiny_checkpoints["llama"], "step_timeout_s = 5\n")
    with launched(tmp_path, text) as (url, process):
        [pid] = rank_pids(1, tmp_path)
        body = {"prompt": [5] * 8, "max_tokens": 3000, "ignore_eos": True, "stream": True}
        started = time.monotonic()
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: {")
            os.kill(pid, signal.SIGKILL)
            rest = [line for line in lines if line]
        assert any('"error"' in line for line in rest), rest[-3:]
        health = httpx.get(url + "/health", timeout=5)
        assert health.status_code == 503 and "rank 1" in health.json()["error"], health.text
        assert time.monotonic() - started < 25
        assert process.wait(30) != 0


def test_a_hung_rank_is_detected_within_the_step_timeout(tmp_path: Path, tiny_checkpoints) -> None:
    text = config_text(tmp_path, tiny_checkpoints["llama"], "step_timeout_s = 2\n")
    with launched(tmp_path, text) as (url, process):
        [pid] = rank_pids(1, tmp_path)
        os.kill(pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            body = {"prompt": [5] * 8, "max_tokens": 50}
            response = httpx.post(url + "/v1/completions", json=body, timeout=30)
            assert response.status_code >= 500
            assert "did not answer within" in response.json()["error"]["message"]
            assert time.monotonic() - started < 10
            health = httpx.get(url + "/health", timeout=5)
            assert health.status_code == 503 and "rank 1" in health.json()["error"]
            os.kill(pid, signal.SIGCONT)  # a stopped process cannot take mlx.launch's SIGTERM
            assert process.wait(30) != 0
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
