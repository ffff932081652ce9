"""Tool calls on /v1/chat/completions, end to end, on every built-in family."""

from __future__ import annotations

import concurrent.futures
import json
from collections.abc import Iterator

import jsonschema
import openai
import pytest

from ..support.server import RunningServer, post, running_server, write_config

FAMILIES = ["llama", "qwen", "mistral", "deepseek"]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 12}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, TIME]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoints) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("tools")
    models = "".join(
        f'[models.{family}]\nsource = "{tiny_checkpoints[family]}"\n' for family in FAMILIES
    )
    config = write_config(
        tmp,
        f'[registry]\ndefault_model = "llama"\ncache_dir = "{tmp / "cache"}"\n'
        f"max_loaded_models = 4\n{models}"
        "[kv_cache]\nmax_sequence_length = 4096\n",
    )
    with running_server(config) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def assert_valid_calls(calls: list, names: set[str]) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("family", FAMILIES)
def test_required_tool_choice_always_gives_valid_calls(client: openai.OpenAI, family: str) -> None:
    for seed in range(3):
        response = client.chat.completions.create(
            model=family,
            messages=ASK,
            tools=TOOLS,
            tool_choice="required",
            parallel_tool_calls=False,
            temperature=1.0,
            seed=seed,
            max_tokens=600,
        )
        choice = response.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert_valid_calls(choice.message.tool_calls, {"get_weather", "get_time"})
        assert len(choice.message.tool_calls) == 1


def test_parallel_calls_are_all_valid(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model="qwen",
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        temperature=1.0,
        seed=7,
        max_tokens=2000,
    )
    assert_valid_calls(response.choices[0].message.tool_calls, {"get_weather", "get_time"})


@pytest.mark.parametrize("family", FAMILIES)
def test_a_named_tool_is_the_one_called(client: openai.OpenAI, family: str) -> None:
    response = client.chat.completions.create(
        model=family,
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        temperature=0,
        max_tokens=600,
    )
    calls = response.choices[0].message.tool_calls
    assert_valid_calls(calls, {"get_time"})
    assert len(calls) == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_calls_equal_whole_ones(client: openai.OpenAI, family: str) -> None:
    kwargs = {
        "model": family,
        "messages": ASK,
        "tools": TOOLS,
        "tool_choice": "required",
        "temperature": 0,
        "max_tokens": 600,
        "parallel_tool_calls": False,
    }
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls
    streamed: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or ():
                call = streamed.setdefault(delta.index, {"name": "", "arguments": ""})
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
    assert finish == "tool_calls"
    assert [streamed[i] for i in sorted(streamed)] == [
        {"name": c.function.name, "arguments": c.function.arguments} for c in whole
    ]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_tool_round_trip(client: openai.OpenAI, family: str) -> None:
    first = (
        client.chat.completions.create(
            model=family,
            messages=ASK,
            tools=TOOLS,
            tool_choice="required",
            parallel_tool_calls=False,
            temperature=0,
            max_tokens=600,
        )
        .choices[0]
        .message
    )
    call = first.tool_calls[0]
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
    ]
    answer = client.chat.completions.create(
        model=family,
        messages=history,
        tools=TOOLS,
        tool_choice="none",
        temperature=0,
        max_tokens=20,
    )
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.choices[0].message.tool_calls is None
    assert answer.usage.prompt_tokens > 0


def test_calls_and_plain_requests_batched_equal_one_at_a_time(client: openai.OpenAI) -> None:
    def ask(i: int) -> object:
        tools = {"tools": TOOLS, "tool_choice": "required"} if i % 2 else {}
        message = [{"role": "user", "content": f"Question number {i}?"}]
        response = client.chat.completions.create(
            model="qwen", messages=message, temperature=0, max_tokens=120, **tools
        )
        return response.choices[0].message.model_dump()

    alone = [ask(i) for i in range(6)]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        together = list(pool.map(ask, range(6)))
    strip = [{**m, "tool_calls": [c["function"] for c in m["tool_calls"] or ()]} for m in alone]
    same = [{**m, "tool_calls": [c["function"] for c in m["tool_calls"] or ()]} for m in together]
    assert same == strip


def test_bad_tool_choices_are_400(server: RunningServer) -> None:
    body = {"model": "llama", "messages": ASK, "tools": TOOLS}
    missing = post(
        server,
        "/v1/chat/completions",
        json={**body, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
    )
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "tool_choice"
    no_tools = post(
        server,
        "/v1/chat/completions",
        json={"model": "llama", "messages": ASK, "tool_choice": "required"},
    )
    assert no_tools.status_code == 400
    bad_tool = post(server, "/v1/chat/completions", json={**body, "tools": [{"type": "retrieval"}]})
    assert bad_tool.status_code == 400


def test_a_forced_tool_whose_schema_cannot_compile_is_named(server: RunningServer) -> None:
    broken = {"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}
    body = {"model": "llama", "messages": ASK, "tools": [*TOOLS, broken]}
    named = post(
        server,
        "/v1/chat/completions",
        json={**body, "tool_choice": {"type": "function", "function": {"name": "f"}}},
    )
    assert named.status_code == 400, named.text
    assert named.json()["error"]["param"] == f"tools[{len(TOOLS)}].function.parameters"
    required = post(server, "/v1/chat/completions", json={**body, "tool_choice": "required"})
    assert required.status_code == 400 and required.json()["error"]["param"] == "tools"
