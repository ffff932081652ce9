"""POST /v1/responses end to end: a real uvicorn server and the official openai client."""

from __future__ import annotations

import json
from collections.abc import Iterator

import jsonschema
import openai
import pytest

from ..support.server import RunningServer, every_family_config, post, running_server, write_config

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 20},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
    "strict": True,
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "rank": {"type": "integer", "minimum": 1, "maximum": 99},
    },
    "required": ["city", "rank"],
    "additionalProperties": False,
}
JSON_FORMAT = {"format": {"type": "json_schema", "name": "city", "schema": SCHEMA, "strict": True}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoints) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("responses")
    config = write_config(
        tmp,
        every_family_config(
            tmp,
            tiny_checkpoints,
            "qwen",
            aliases='"gpt-4o-mini"',
            extra="[kv_cache]\nmax_sequence_length = 4096\n",
        ),
    )
    with running_server(config) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=server.url + "/v1",
        api_key="unused",
        max_retries=0,
        _strict_response_validation=True,
    )


def create(client: openai.OpenAI, **kwargs: object) -> object:
    kwargs.setdefault("model", "qwen")
    kwargs.setdefault("input", "Hello there!")
    kwargs.setdefault("temperature", 0)
    kwargs.setdefault("max_output_tokens", 12)
    return client.responses.create(**kwargs)


def test_a_text_reply_is_a_response_the_client_parses(client: openai.OpenAI) -> None:
    response = create(client, instructions="Be brief.", metadata={"k": "v"}, user="u1")
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.status in ("completed", "incomplete") and response.model == "qwen"
    [message] = response.output
    assert message.type == "message" and message.role == "assistant"
    assert message.id.startswith("msg_") and message.content[0].type == "output_text"
    assert response.output_text == message.content[0].text
    usage = response.usage
    assert usage.input_tokens > 0 and 0 < usage.output_tokens <= 12
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.output_tokens_details.reasoning_tokens == 0
    assert response.instructions == "Be brief." and response.metadata == {"k": "v"}
    assert response.temperature == 0 and response.text.format.type == "text"
    assert response.tools == [] and response.parallel_tool_calls and not response.store


def test_max_output_tokens_makes_an_incomplete_response(client: openai.OpenAI) -> None:
    response = create(client, max_output_tokens=2)
    if response.usage.output_tokens == 2:  # random weights may end earlier
        assert response.status == "incomplete"
        assert response.incomplete_details.reason == "max_output_tokens"
        assert response.output[0].status == "incomplete"


def test_greedy_text_equals_chat_completions(client: openai.OpenAI) -> None:
    history = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Hello!"}]},
        {"role": "user", "content": [{"type": "input_text", "text": "Tell me a story."}]},
    ]
    response = create(client, instructions="You are terse.", input=history, max_output_tokens=16)
    chat = client.chat.completions.create(
        model="qwen",
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Tell me a story."},
        ],
        temperature=0,
        max_tokens=16,
    )
    assert response.output_text == chat.choices[0].message.content
    assert response.usage.input_tokens == chat.usage.prompt_tokens


def test_the_event_stream_builds_the_same_response(client: openai.OpenAI) -> None:
    events = list(create(client, stream=True, max_output_tokens=16))
    kinds = [event.type for event in events]
    assert kinds[:5] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
    ]
    assert kinds[-4:-1] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [event.sequence_number for event in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert final.output_text == text == events[-4].text
    assert text == create(client, max_output_tokens=16).output_text


def test_the_stream_helper_gives_the_final_response(client: openai.OpenAI) -> None:
    # the helper wants response.completed: a finished JSON value ends the reply before the limit
    with client.responses.stream(
        model="qwen", input="Hello there!", text=JSON_FORMAT, max_output_tokens=200
    ) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.status == "completed" and final.output_text == "".join(deltas)
    jsonschema.validate(json.loads(final.output_text), SCHEMA)


def function_calls(response: object) -> list[object]:
    calls = [item for item in response.output if item.type == "function_call"]
    assert calls
    for call in calls:
        assert call.id.startswith("fc_") and call.call_id.startswith("call_")
        assert call.name == "get_weather" and call.status == "completed"
        jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    return calls


@pytest.mark.parametrize("family", ["llama", "qwen", "mistral", "deepseek"])
def test_a_tool_round_trip(client: openai.OpenAI, family: str) -> None:
    asked = create(
        client,
        model=family,
        input=ASK,
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        max_output_tokens=600,
    )
    calls = function_calls(asked)
    assert asked.tools[0].name == "get_weather" and asked.tool_choice == "required"
    history = ASK + [item.model_dump(exclude_none=True) for item in asked.output]
    history += [
        {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"}
        for call in calls
    ]
    answer = create(client, model=family, input=history, tools=[WEATHER], max_output_tokens=8)
    assert answer.status in ("completed", "incomplete") and answer.output


def test_a_named_tool_choice_streams_a_function_call(client: openai.OpenAI) -> None:
    choice = {"type": "function", "name": "get_weather"}
    events = list(
        create(
            client,
            input=ASK,
            tools=[WEATHER],
            tool_choice=choice,
            max_output_tokens=400,
            stream=True,
        )
    )
    kinds = [event.type for event in events]
    assert "response.function_call_arguments.done" in kinds and kinds[-1] == "response.completed"
    [done] = [e for e in events if e.type == "response.function_call_arguments.done"]
    [call] = function_calls(events[-1].response)
    assert done.arguments == call.arguments and done.item_id == call.id


def test_json_schema_output_validates(client: openai.OpenAI) -> None:
    response = create(client, text=JSON_FORMAT, temperature=1, max_output_tokens=200)
    assert response.status == "completed" and response.text.format.type == "json_schema"
    jsonschema.validate(json.loads(response.output_text), SCHEMA)
    response = create(client, text={"format": {"type": "json_object"}}, max_output_tokens=200)
    if response.status == "completed":  # any JSON object may be longer than the limit
        assert isinstance(json.loads(response.output_text), dict)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"previous_response_id": "resp_123"}, "previous_response_id"),
        ({"store": True}, "store"),
        ({"temperature": "hot"}, "temperature"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, "input"),
        ({"tools": [{"type": "namespace", "name": "ns", "tools": [{"type": "x"}]}]}, "tools"),
        ({"tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
        ({"text": {"format": {"type": "yaml"}}}, "text.format.type"),
    ],
)
def test_bad_requests_are_openai_shaped_400s(
    server: RunningServer, fields: dict, param: str
) -> None:
    reply = post(server, "/v1/responses", json={"model": "qwen", "input": "Hi"} | fields)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"].startswith(param)
    if "previous_response_id" in fields:
        assert "send the whole conversation in input" in error["message"]


def test_unknown_model_is_a_404_and_aliases_resolve(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        create(client, model="nope")
    assert caught.value.body["code"] == "model_not_found"
    assert create(client, model="gpt-4o-mini", max_output_tokens=2).model == "qwen"


CODEX_TOOLS = [
    {
        "type": "function",
        "name": "shell",
        "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
    },
    {
        "type": "namespace",
        "name": "multi_agent_v1",
        "description": "Agents that work beside you.",
        "tools": [
            {
                "type": "function",
                "name": "spawn_agent",
                "parameters": {
                    "type": "object",
                    "properties": {"message": {"type": "string", "maxLength": 8}},
                    "required": ["message"],
                    "additionalProperties": False,
                },
            }
        ],
    },
    {"type": "web_search", "external_web_access": False},
    {"type": "image_generation"},
]


def test_tools_as_codex_sends_them(server: RunningServer) -> None:
    """Function tools beside a namespace of them and hosted tools: the hosted ones are left out
    (named in a header), the namespace's tools offered, and a call of one names its namespace
    apart; sent back in the next turn, it is understood."""
    body = {
        "model": "qwen",
        "input": "Start a helper.",
        "tools": CODEX_TOOLS,
        "tool_choice": {"type": "function", "name": "spawn_agent"},
        "max_output_tokens": 64,
        "temperature": 0,
        "some_future_field": {"ignored": True},
    }
    reply = post(server, "/v1/responses", json=body)
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-mlxserve-ignored-tools"] == "image_generation, web_search"
    calls = [item for item in reply.json()["output"] if item["type"] == "function_call"]
    assert [(c["name"], c["namespace"]) for c in calls] == [("spawn_agent", "multi_agent_v1")]
    history = [
        {"role": "user", "content": "Start a helper."},
        {
            "type": "function_call",
            "call_id": "call_1",
            "name": "spawn_agent",
            "namespace": "multi_agent_v1",
            "arguments": '{"message": "hi"}',
        },
        {"type": "function_call_output", "call_id": "call_1", "output": "started"},
    ]
    again = post(server, "/v1/responses", json={**body, "input": history, "tool_choice": "auto"})
    assert again.status_code == 200, again.text
    streamed = post(server, "/v1/responses", json={**body, "stream": True})
    assert streamed.status_code == 200
    assert streamed.headers["x-mlxserve-ignored-tools"] == "image_generation, web_search"
    assert "response.completed" in streamed.text
