"""Two ranks (pipeline or tensor, ``mlxserve launch``) follow a JSON schema and call tools with
the same tokens as one rank."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from ..support.processes import launched, two_ranks_config
from ..support.server import RunningServer, running_server, write_config
from ..support.structured import MAX_TOKENS, MESSAGES, RESPONSE_FORMAT, chat


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, tiny_checkpoints: dict[str, Path]
) -> Iterator[RunningServer]:
    """One rank, in a thread: the reference."""
    tmp = tmp_path_factory.mktemp("structured-one-rank")
    text = (
        f'[registry]\ndefault_model = "qwen"\ncache_dir = "{tmp / "cache"}"\n'
        f'[models.qwen]\nsource = "{tiny_checkpoints["qwen"]}"\n'
    )
    with running_server(write_config(tmp, text)) as running:
        yield running


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


@pytest.mark.parametrize("strategy", ["pipeline", "tensor"])
def test_two_ranks_follow_grammars_and_call_tools_like_one(
    server: RunningServer, tmp_path: Path, tiny_checkpoints: dict[str, Path], strategy: str
) -> None:
    expected, _ = chat(server, "qwen", temperature=0)
    local = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    tools = {"tools": [WEATHER_TOOL], "tool_choice": "required", "parallel_tool_calls": False}
    ask = [{"role": "user", "content": "Weather in Oslo?"}]
    call = (
        local.chat.completions.create(
            model="qwen", messages=ask, max_tokens=300, temperature=0, **tools
        )
        .choices[0]
        .message.tool_calls[0]
        .function
    )
    text = two_ranks_config(tmp_path, tiny_checkpoints["qwen"], f'strategy = "{strategy}"\n')
    with launched(tmp_path, text) as (url, _):
        api = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        response = api.chat.completions.create(
            model="m",
            messages=MESSAGES,
            max_tokens=MAX_TOKENS,
            temperature=0,
            response_format=RESPONSE_FORMAT,
        )
        called = api.chat.completions.create(
            model="m", messages=ask, max_tokens=300, temperature=0, **tools
        ).choices[0]
    assert response.choices[0].message.content == expected
    assert response.choices[0].finish_reason == "stop"
    assert called.finish_reason == "tool_calls"
    assert called.message.tool_calls[0].function == call
