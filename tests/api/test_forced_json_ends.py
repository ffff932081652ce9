"""Issue 19: a forced tool call whose schema lacks ``additionalProperties`` (LangChain's
``with_structured_output``, pydantic-ai, instructor) and ``json_object`` output end on the
demo model, for every seed, well before ``max_tokens``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from ..support.server import RunningServer, running_server, write_config

SEEDS = range(20)
MAX_TOKENS = 200
# What LangChain sends for with_structured_output(Person) in its forced-tool mode.
PERSON = {
    "type": "function",
    "function": {
        "name": "Person",
        "description": "Information about a person.",
        "parameters": {
            "type": "object",
            "properties": {
                "name": {"description": "The person's name", "type": "string"},
                "age": {"description": "The person's age in years", "type": "integer"},
            },
            "required": ["name", "age"],
        },
    },
}
ASK = [{"role": "user", "content": "Alice is 30 years old. Extract the person."}]
ASK_JSON = [{"role": "user", "content": "Give Alice's name and age (30) as a JSON object."}]


@pytest.fixture(scope="module")
def client(demo_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    config = write_config(
        tmp_path_factory.mktemp("ends"), f'[registry]\ncache_dir = "{demo_cache}"\n'
    )
    with running_server(config) as server:
        yield _client(server)


def _client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def _for_every_seed(ask: Any) -> list[Any]:
    with ThreadPoolExecutor(8) as pool:  # batched together by the engine
        return list(pool.map(ask, SEEDS))


@pytest.mark.parametrize("tool_choice", ["named", "required"])
def test_a_forced_call_without_additional_properties_ends(
    client: openai.OpenAI, tool_choice: str
) -> None:
    choice: Any = (
        {"type": "function", "function": {"name": "Person"}}
        if tool_choice == "named"
        else "required"
    )

    def ask(seed: int) -> Any:
        return client.chat.completions.create(
            model="demo",
            messages=ASK,  # type: ignore[arg-type]
            tools=[PERSON],  # type: ignore[list-item]
            tool_choice=choice,
            seed=seed,
            max_tokens=MAX_TOKENS,
        ).choices[0]

    schema = PERSON["function"]["parameters"] | {"additionalProperties": False}
    for seed, reply in zip(SEEDS, _for_every_seed(ask), strict=True):
        assert reply.finish_reason == "tool_calls", (seed, reply.message.content)
        calls = reply.message.tool_calls or []
        assert calls and calls[0].function.name == "Person"
        arguments = json.loads(calls[0].function.arguments)
        jsonschema.validate(arguments, schema)  # the declared keys only, each once


def test_json_object_output_ends(client: openai.OpenAI) -> None:
    def ask(seed: int) -> Any:
        return client.chat.completions.create(
            model="demo",
            messages=ASK_JSON,  # type: ignore[arg-type]
            response_format={"type": "json_object"},
            seed=seed,
            max_tokens=MAX_TOKENS,
        ).choices[0]

    for seed, reply in zip(SEEDS, _for_every_seed(ask), strict=True):
        assert reply.finish_reason == "stop", (seed, reply.message.content)
        assert isinstance(json.loads(reply.message.content or ""), dict)
