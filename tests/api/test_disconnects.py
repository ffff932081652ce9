"""A client that goes away mid-request, on every generating API, streamed or not: the request
is aborted (its KV freed), counted as ``client_disconnected``, and nothing else happens: no
500, no traceback in the log. A real server on 127.0.0.1 throughout."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ..support.server import RunningServer, running_server, wait_until, write_config

LONG = 3000  # tokens asked for: far more than the client waits for (greedy: no early eos)
ASK = [{"role": "user", "content": "Tell me a very long story."}]
BODIES = {
    "/v1/messages": {"messages": ASK, "max_tokens": LONG, "temperature": 0},
    "/v1/chat/completions": {"messages": ASK, "max_tokens": LONG, "ignore_eos": True},
    "/v1/responses": {
        "input": "Tell me a very long story.",
        "max_output_tokens": LONG,
        "temperature": 0,
    },
    "/v1/completions": {"prompt": [5, 9, 77], "max_tokens": LONG, "ignore_eos": True},
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoints) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("disconnects")
    config = write_config(
        tmp,
        f'[registry]\ndefault_model = "m"\ncache_dir = "{tmp / "cache"}"\n'
        f'[models.m]\nsource = "{tiny_checkpoints["llama"]}"\n'
        "[kv_cache]\nmax_sequence_length = 4096\n",
    )
    with running_server(config) as running:
        yield running


@pytest.fixture
def server_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Everything the server logs, uvicorn's own loggers (which do not propagate) included."""
    uvicorn = logging.getLogger("uvicorn")
    uvicorn.addHandler(caplog.handler)
    caplog.set_level(logging.INFO)
    try:
        yield caplog
    finally:
        uvicorn.removeHandler(caplog.handler)


def metrics(server: RunningServer) -> list[str]:
    return httpx.get(server.url + "/metrics", timeout=30).text.splitlines()


def value(lines: list[str], name: str, **labels: str) -> float:
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    found = [
        float(line.split()[-1])
        for line in lines
        if line.startswith(name + "{") and all(w in line for w in wanted)
    ]
    return sum(found)


def go_away(server: RunningServer, path: str, stream: bool) -> None:
    """Send a long request and leave: after its first event, or (not streamed) mid-wait."""
    body = {**BODIES[path], "model": "m", "stream": stream}
    if stream:
        with httpx.stream("POST", server.url + path, json=body, timeout=30) as response:
            assert response.status_code == 200
            assert next(line for line in response.iter_lines() if line.strip())
        return
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + path, json=body, timeout=0.5)


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "not-streamed"])
@pytest.mark.parametrize("path", list(BODIES))
def test_a_client_that_goes_away_aborts_its_request_and_nothing_more(
    server: RunningServer, server_log: pytest.LogCaptureFixture, path: str, stream: bool
) -> None:
    before = metrics(server)
    server_log.clear()
    go_away(server, path, stream)
    worker = server.engine.workers["m"]
    assert wait_until(
        lambda: (
            worker.scheduler.num_active == 0
            and not worker.runner.rows
            and not server.engine.streams
        ),
        timeout=5,
    ), "the request was not aborted"
    time.sleep(0.5)  # the handler runs on after the abort: give a failure time to show
    after = metrics(server)
    gone = "mlxserve_request_errors_total"
    assert value(after, gone, kind="client_disconnected") == (
        value(before, gone, kind="client_disconnected") + 1
    )
    assert (
        value(after, "mlxserve_generation_tokens_total")
        - value(before, "mlxserve_generation_tokens_total")
        < LONG
    )  # stopped early
    errors = "mlxserve_http_errors_total"
    for status in ("500", "503", "504"):
        assert value(after, errors, status=status) == value(before, errors, status=status)
    noisy = [r for r in server_log.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not noisy, [r.getMessage() for r in noisy]
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200


def test_a_prefill_given_up_part_way_is_taken_up_where_it_left_off(
    tmp_path: Path, tiny_checkpoints, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that gives up during a long prompt's prefill (an agent's timeout) and asks
    again finds the blocks computed so far in the prefix cache; the answer is a cold one's."""
    from mlxserve.server import streaming

    monkeypatch.setattr(streaming, "FIRST_ITEM_WAIT_S", 0.0)  # the stream starts at once
    prompt = [(i * 11) % 400 + 3 for i in range(4000)]
    body = {"model": "m", "prompt": prompt, "max_tokens": 4, "temperature": 0}

    def config(name: str):  # noqa: ANN202
        tmp = tmp_path / name
        tmp.mkdir()
        return write_config(
            tmp,
            f'[registry]\ndefault_model = "m"\ncache_dir = "{tmp / "cache"}"\n'
            f'[models.m]\nsource = "{tiny_checkpoints["llama"]}"\n'
            "[performance]\nprefill_step_size = 32\n",
        )

    with running_server(config("cold")) as cold:
        expected = httpx.post(cold.url + "/v1/completions", json=body, timeout=60).json()
    with running_server(config("warm")) as server:
        scheduler = server.engine.workers["m"].scheduler
        stream = {**body, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=stream, timeout=30):
            assert wait_until(
                lambda: any(s.num_prefilled >= 1024 for s in scheduler.prefilling), timeout=30
            )
        assert wait_until(lambda: scheduler.num_active == 0, timeout=10)
        again = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
    assert 1024 <= again["usage"]["prompt_tokens_details"]["cached_tokens"] < 4000
    assert again["choices"] == expected["choices"]
