"""Admission is cheap and comes first: text the template would see is counted before any
tokenizing, a full queue is refused before any tokenizing or grammar compiling, and one
request's tokenizing does not make the others wait. A real server on loopback throughout."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from mlxserve.core.sampling import constraint as constraint_module
from mlxserve.server.tokenizing import TOKENIZER_THREADS, own_copy, with_own_tokenizer

from ..support.server import RunningServer, running_server, write_config

BIG = 7 * 2**20  # under max_request_bytes (8 MiB), far over what the context can hold
# Today's tokenizer took 10-14 s on such text, holding the one lock every request needed;
# counted first, it is refused in well under a second. A generous bound for a busy machine:
REFUSED_WITHIN_S = 3.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoints) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("admission")
    config = write_config(
        tmp,
        f"""
[registry]
default_model = "llama"
cache_dir = "{tmp / "cache"}"
[models.llama]
source = "{tiny_checkpoints["llama"]}"
[kv_cache]
max_sequence_length = 1024
""",
    )
    with running_server(config) as running:
        yield running


def _tool(description: str = "a tool") -> dict[str, Any]:
    parameters = {"type": "object", "properties": {"x": {"type": "string"}}}
    return {
        "type": "function",
        "function": {"name": "f", "description": description, "parameters": parameters},
    }


def _chat(**extra: Any) -> dict[str, Any]:
    return {
        "model": "llama",
        "max_tokens": 4,
        "temperature": 0,
        "messages": [{"role": "user", "content": "hi"}],
    } | extra


def _assistant_call(arguments: str) -> list[dict[str, Any]]:
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": arguments}}
    return [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "ok"},
    ]


BIG_TEXT = "word " * (BIG // 5)

# (path, body) pairs whose text reaches the chat template outside messages[].content
HIDDEN_TEXT: dict[str, tuple[str, Callable[[], dict[str, Any]]]] = {
    "tool description": ("/v1/chat/completions", lambda: _chat(tools=[_tool(BIG_TEXT)])),
    "assistant tool_calls arguments": (
        "/v1/chat/completions",
        lambda: _chat(messages=_assistant_call(json.dumps({"x": BIG_TEXT}))),
    ),
    "16,000 empty messages": (
        "/v1/chat/completions",
        lambda: _chat(messages=[{"role": "user", "content": ""}] * 16_000),
    ),
    "responses function_call arguments": (
        "/v1/responses",
        lambda: {
            "model": "llama",
            "max_output_tokens": 4,
            "input": [
                {"role": "user", "content": "hi"},
                {
                    "type": "function_call",
                    "call_id": "c1",
                    "name": "f",
                    "arguments": json.dumps({"x": BIG_TEXT}),
                },
                {"type": "function_call_output", "call_id": "c1", "output": "ok"},
            ],
        },
    ),
    "messages tool_use input": (
        "/v1/messages",
        lambda: {
            "model": "llama",
            "max_tokens": 4,
            "messages": [
                {"role": "user", "content": "hi"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "tool_use", "id": "t1", "name": "f", "input": {"x": BIG_TEXT}}
                    ],
                },
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "ok"}],
                },
            ],
        },
    ),
}


@pytest.mark.parametrize("shape", list(HIDDEN_TEXT))
def test_text_the_template_sees_is_counted_before_tokenizing(
    server: RunningServer, shape: str
) -> None:
    path, body = HIDDEN_TEXT[shape]
    payload = json.dumps(body()).encode()
    assert len(payload) < 8 * 2**20
    with httpx.Client(base_url=server.url, timeout=60) as http:
        started = time.monotonic()
        response = http.post(path, content=payload, headers={"content-type": "application/json"})
        elapsed = time.monotonic() - started
        assert response.status_code == 400, response.text
        message = json.dumps(response.json())
        if path == "/v1/messages":  # Anthropic's own wording, which Claude Code recovers from
            assert "prompt is too long: " in message and "maximum" in message, message
        else:
            assert "context" in message and "characters" in message, message
        assert elapsed < REFUSED_WITHIN_S, f"{shape}: refused after {elapsed:.1f} s"
        # and the server still answers at once
        assert http.post("/v1/chat/completions", json=_chat()).status_code == 200


@pytest.mark.parametrize(
    "path,body",
    [
        ("/v1/chat/completions", _chat(messages=[{"role": "user", "content": ""}] * 250_000)),
        ("/v1/responses", {"model": "llama", "input": [{"role": "user", "content": ""}] * 250_000}),
        (
            "/v1/messages",
            {
                "model": "llama",
                "max_tokens": 4,
                "messages": [{"role": "user", "content": ""}] * 250_000,
            },
        ),
    ],
)
def test_too_many_messages_are_refused_before_they_are_read(
    server: RunningServer, path: str, body: dict[str, Any]
) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as http:
        started = time.monotonic()
        response = http.post(path, json=body)
        elapsed = time.monotonic() - started
    assert response.status_code == 400, response.text
    assert "at most 16384 items" in response.text
    assert elapsed < REFUSED_WITHIN_S


def test_each_tokenizing_thread_has_its_own_tokenizer_copy(server: RunningServer) -> None:
    """Two prompts tokenize at the same time (a shared lock would break the barrier)."""
    tokenizer = server.engine.workers["llama"].model.tokenizer
    barrier = threading.Barrier(2, timeout=10)

    def work(copy: Any) -> Any:
        barrier.wait()  # both are inside their tokenizer at once
        copy.encode("hello")
        return copy

    async def both() -> list[Any]:
        return await asyncio.gather(
            with_own_tokenizer(tokenizer, work), with_own_tokenizer(tokenizer, work)
        )

    first, second = asyncio.run(both())
    assert first is not second and tokenizer not in (first, second)
    assert first.encode("the capital of France") == tokenizer.encode("the capital of France")
    assert own_copy(tokenizer) is own_copy(tokenizer)  # one copy per thread, reused
    assert TOKENIZER_THREADS >= 2


@pytest.fixture
def busy_server(
    tmp_path: Path, tiny_checkpoints, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[RunningServer, list[int]]]:
    """A server with room for 2 waiting requests and 1 running, counting grammar compiles."""
    compiled: list[int] = []
    original = constraint_module.Constraint.__init__

    def counting(self: Any, *args: Any, **kwargs: Any) -> None:
        compiled.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(constraint_module.Constraint, "__init__", counting)
    config = write_config(
        tmp_path,
        f"""
[registry]
default_model = "llama"
cache_dir = "{tmp_path / "cache"}"
[models.llama]
source = "{tiny_checkpoints["llama"]}"
[performance]
queue_size = 2
max_batch_size = 1
""",
    )
    with running_server(config) as running:
        yield running, compiled


def test_a_full_queue_is_refused_before_any_grammar_is_compiled(
    busy_server: tuple[RunningServer, list[int]],
) -> None:
    server, compiled = busy_server
    schema = {"type": "object", "properties": {f"k{i}": {"type": "string"} for i in range(40)}}
    body = _chat(
        max_tokens=64,
        ignore_eos=True,
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
    )
    with httpx.Client(base_url=server.url, timeout=120) as warm:
        assert warm.post("/v1/chat/completions", json=_chat()).status_code == 200

    def send(_: int) -> tuple[int, float]:
        started = time.monotonic()
        with httpx.Client(base_url=server.url, timeout=120) as http:
            status = http.post("/v1/chat/completions", json=body).status_code
        return status, time.monotonic() - started

    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(send, range(24)))
    statuses = [status for status, _ in results]
    served = statuses.count(200)
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(429) >= 12, statuses
    # Every compiled grammar belongs to a request that was served: none for a refused one.
    assert len(compiled) == served, (len(compiled), statuses)
    assert server.engine.queue_depth() == 0
