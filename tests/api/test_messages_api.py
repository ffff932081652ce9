"""POST /v1/messages end to end: a real uvicorn server and the official anthropic client;
Anthropic-shaped errors and x-api-key auth."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import jsonschema
import openai
import pytest
from mlx_lm.utils import load_tokenizer

from mlxserve.plugins.families.qwen import Qwen
from mlxserve.plugins.tiny import write_tiny_checkpoint

from ..support.server import (
    RunningServer,
    every_family_config,
    post,
    running_server,
    write_config,
)

WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 20},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
KEY = "sk-test-key"
GREEDY = {"temperature": 0}  # this client no longer has sampling arguments; the API still does


def config_text(tmp: Path, checkpoints: dict[str, Path], server: str = "") -> str:
    return (
        server
        + "\n"
        + every_family_config(
            tmp,
            checkpoints,
            "qwen",
            aliases='"claude-test-1"',
            extra=(
                "[kv_cache]\nmax_sequence_length = 4096\n"
                '[registry.model_patterns]\n"claude-*" = "qwen"\n'
            ),
        )
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoints) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("messages")
    with running_server(write_config(tmp, config_text(tmp, tiny_checkpoints))) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=server.url, api_key="unused", max_retries=0, _strict_response_validation=True
    )


def create(client: anthropic.Anthropic, **kwargs: object) -> object:
    kwargs.setdefault("model", "claude-test-1")
    kwargs.setdefault("messages", [{"role": "user", "content": "Hello there!"}])
    kwargs.setdefault("extra_body", GREEDY)
    kwargs.setdefault("max_tokens", 12)
    return client.messages.create(**kwargs)


def test_a_text_reply_is_a_message_the_client_parses(client: anthropic.Anthropic) -> None:
    message = create(client, system=[{"type": "text", "text": "Be brief."}], metadata={})
    assert message.id.startswith("msg_") and message.type == "message"
    assert message.role == "assistant" and message.model == "qwen"
    assert [block.type for block in message.content] in ([], ["text"])
    assert message.stop_reason in ("end_turn", "max_tokens") and message.stop_sequence is None
    assert message.usage.input_tokens > 0 and 0 < message.usage.output_tokens <= 12


def test_greedy_text_equals_chat_completions(
    server: RunningServer, client: anthropic.Anthropic
) -> None:
    history = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello!"}]},
        {"role": "user", "content": "Tell me a story."},
    ]
    message = create(client, system="You are terse.", messages=history, max_tokens=16)
    chat = openai.OpenAI(base_url=server.url + "/v1", api_key="x").chat.completions.create(
        model="qwen",
        messages=[{"role": "system", "content": "You are terse."}]
        + [
            {"role": m["role"], "content": "Hello!" if m["role"] == "assistant" else m["content"]}
            for m in history
        ],
        temperature=0,
        max_tokens=16,
    )
    assert "".join(b.text for b in message.content) == chat.choices[0].message.content
    assert message.usage.input_tokens == chat.usage.prompt_tokens


def test_a_stop_sequence_is_reported(client: anthropic.Anthropic) -> None:
    text = "".join(b.text for b in create(client, max_tokens=24).content)
    assert len(text) >= 3
    stop = text[-3:]
    message = create(client, max_tokens=24, stop_sequences=["never said", stop])
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == stop
    assert "".join(b.text for b in message.content) == text[: text.find(stop)]
    assert create(client, max_tokens=24, stop_sequences=["never said"]).stop_sequence is None


def test_the_event_stream_builds_the_same_message(client: anthropic.Anthropic) -> None:
    events = list(create(client, stream=True, max_tokens=16))
    kinds = [event.type for event in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert kinds[1:3] == ["content_block_start", "content_block_delta"]
    assert kinds[-3] == "content_block_stop"
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta")
    assert text == "".join(b.text for b in create(client, max_tokens=16).content)
    assert events[-2].usage.output_tokens > 0


def test_the_stream_helper_gives_the_final_message(client: anthropic.Anthropic) -> None:
    with client.messages.stream(
        model="qwen", messages=ASK, max_tokens=10, extra_body=GREEDY
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(b.text for b in final.content) == text
    assert final.stop_reason in ("end_turn", "max_tokens") and final.usage.output_tokens > 0


def tool_uses(message: object) -> list[object]:
    assert message.stop_reason == "tool_use"
    uses = [block for block in message.content if block.type == "tool_use"]
    assert uses
    for use in uses:
        assert use.id.startswith("toolu_") and use.name == "get_weather"
        jsonschema.validate(use.input, WEATHER["input_schema"])
    return uses


@pytest.mark.parametrize("family", ["llama", "qwen", "mistral", "deepseek"])
def test_a_tool_round_trip(client: anthropic.Anthropic, family: str) -> None:
    asked = create(
        client,
        model=family,
        messages=ASK,
        tools=[WEATHER],
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
        max_tokens=600,
    )
    uses = tool_uses(asked)
    results = [
        {
            "type": "tool_result",
            "tool_use_id": use.id,
            "content": [{"type": "text", "text": "21 C"}],
        }
        for use in uses
    ]
    history = ASK + [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in asked.content]},
        {"role": "user", "content": results},
    ]
    answer = create(client, model=family, messages=history, tools=[WEATHER], max_tokens=8)
    assert answer.stop_reason in ("end_turn", "max_tokens", "tool_use")


def test_a_streamed_tool_call_arrives_as_input_json(client: anthropic.Anthropic) -> None:
    choice = {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}
    with client.messages.stream(
        model="qwen", messages=ASK, tools=[WEATHER], tool_choice=choice, max_tokens=400
    ) as stream:
        events = list(stream)
        final = stream.get_final_message()
    [use] = tool_uses(final)
    partial = "".join(
        e.delta.partial_json
        for e in events
        if e.type == "content_block_delta" and e.delta.type == "input_json_delta"
    )
    assert json.loads(partial) == use.input


@pytest.mark.parametrize(
    ("fields", "status", "kind"),
    [
        ({"model": "nope"}, 404, "not_found_error"),
        ({"max_tokens": None}, 400, "invalid_request_error"),
        ({"temperature": "hot"}, 400, "invalid_request_error"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
            400,
            "invalid_request_error",
        ),
        ({"tools": [{"type": "web_search_20250305", "name": "web"}]}, 400, "invalid_request_error"),
        ({"tool_choice": {"type": "tool", "name": "nope"}}, 400, "invalid_request_error"),
        ({"messages": [{"role": "assistant", "content": "Prefill"}]}, 400, "invalid_request_error"),
    ],
)
def test_errors_are_anthropic_shaped(
    server: RunningServer, fields: dict, status: int, kind: str
) -> None:
    body = {"model": "qwen", "max_tokens": 4, "messages": ASK} | fields
    reply = post(server, "/v1/messages", json={k: v for k, v in body.items() if v is not None})
    assert reply.status_code == status, reply.text
    assert reply.json()["type"] == "error" and reply.json()["error"]["type"] == kind
    assert reply.json()["error"]["message"]


def test_the_client_raises_typed_errors(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as caught:
        create(client, model="nope")
    assert caught.value.body["error"]["type"] == "not_found_error"


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoints) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("guarded")
    settings = f'[server]\napi_keys = ["{KEY}"]\nmax_request_bytes = 4096'
    with running_server(write_config(tmp, config_text(tmp, tiny_checkpoints, settings))) as running:
        yield running


def test_x_api_key_is_accepted_everywhere(guarded: RunningServer) -> None:
    message = {"model": "qwen", "max_tokens": 2, "messages": ASK}
    for path, body in [
        ("/v1/messages", message),
        ("/v1/responses", {"model": "qwen", "input": "Hi", "max_output_tokens": 2}),
        ("/v1/chat/completions", {"model": "qwen", "messages": ASK, "max_tokens": 2}),
    ]:
        assert post(guarded, path, json=body, headers={"x-api-key": KEY}).status_code == 200
    client = anthropic.Anthropic(base_url=guarded.url, api_key=KEY, max_retries=0)
    assert client.messages.create(**message).type == "message"


def test_auth_and_size_errors_take_each_apis_shape(guarded: RunningServer) -> None:
    wrong = {"x-api-key": "wrong"}
    reply = post(guarded, "/v1/messages", json={}, headers=wrong)
    assert reply.status_code == 401
    assert reply.json()["error"]["type"] == "authentication_error"
    reply = post(guarded, "/v1/responses", json={}, headers=wrong)
    assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is found while reading
        yield b'{"model": "qwen", "messages": [' + b" " * 8192 + b"]}"

    reply = httpx.post(
        guarded.url + "/v1/messages", content=chunks(), headers={"x-api-key": KEY}, timeout=30
    )
    assert reply.status_code == 413 and reply.json()["error"]["type"] == "request_too_large"


# --- Claude Code's requests (issue 19) ----------------------------------------------------------

CONTEXT = 4096  # [kv_cache] max_sequence_length of these servers
MID_SYSTEM = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "system", "content": [{"type": "text", "text": "From now on, answer in French."}]},
    {"role": "user", "content": "Tell me a story."},
]
# The same conversation in the chat template's shape, with the request's top system turn.
MID_SYSTEM_CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "system", "content": "From now on, answer in French."},
    {"role": "user", "content": "Tell me a story."},
]


def count(server: RunningServer, body: dict, **kwargs: object) -> httpx.Response:
    return post(server, "/v1/messages/count_tokens", json=body, **kwargs)


def rendered(checkpoint: Path, messages: list[dict]) -> int:
    tokenizer = load_tokenizer(checkpoint)
    return len(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def test_a_system_message_mid_conversation_stands_where_it_is(
    client: anthropic.Anthropic, tiny_checkpoints: dict[str, Path]
) -> None:
    message = create(client, system="You are terse.", messages=MID_SYSTEM, max_tokens=4)
    counted = client.messages.count_tokens(
        model="claude-test-1", system="You are terse.", messages=MID_SYSTEM
    )
    expected = rendered(tiny_checkpoints["qwen"], MID_SYSTEM_CHAT)
    assert message.usage.input_tokens == counted.input_tokens == expected
    without = [m for m in MID_SYSTEM if m["role"] != "system"]
    fewer = client.messages.count_tokens(model="qwen", system="You are terse.", messages=without)
    assert fewer.input_tokens < expected


@pytest.mark.parametrize(
    ("content", "param"),
    [
        ([{"type": "tool_use", "id": "t", "name": "x", "input": {}}], "messages.1.content"),
        (42, "messages.1.content"),
    ],
)
def test_a_system_message_takes_text_only(
    server: RunningServer, content: object, param: str
) -> None:
    messages = [*ASK, {"role": "system", "content": content}]
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        body = {"model": "qwen", "max_tokens": 4, "messages": messages}
        reply = post(server, path, json=body)
        assert reply.status_code == 400, reply.text
        assert reply.json()["error"]["type"] == "invalid_request_error"
        assert reply.json()["error"]["message"].startswith(param)


# A template that takes a system turn only first, as some do: mid-conversation ones are merged.
STRICT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and not loop.first %}"
    "{{ raise_exception('a system message must come first') }}{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def strict_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("strict") / "strict"
    return write_tiny_checkpoint(Qwen(), dest, chat_template=STRICT_TEMPLATE)


@pytest.fixture(scope="module")
def strict(
    tmp_path_factory: pytest.TempPathFactory, strict_checkpoint: Path
) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("strict-server")
    config = write_config(
        tmp,
        f'[registry]\ndefault_model = "strict"\ncache_dir = "{tmp / "cache"}"\n'
        f'[models.strict]\nsource = "{strict_checkpoint}"\n',
    )
    with running_server(config) as running:
        yield running


def test_a_template_that_takes_system_first_gets_them_merged(
    strict: RunningServer, strict_checkpoint: Path
) -> None:
    client = anthropic.Anthropic(base_url=strict.url, api_key="unused", max_retries=0)
    message = create(
        client, model="strict", system="You are terse.", messages=MID_SYSTEM, max_tokens=4
    )
    merged = [
        {"role": "system", "content": "You are terse.\n\nFrom now on, answer in French."},
        *[m for m in MID_SYSTEM_CHAT if m["role"] != "system"],
    ]
    assert message.usage.input_tokens == rendered(strict_checkpoint, merged)
    # with no top system turn, the first system message becomes it
    counted = client.messages.count_tokens(model="strict", messages=MID_SYSTEM)
    alone = [{"role": "system", "content": "From now on, answer in French."}, *merged[1:]]
    assert counted.input_tokens == rendered(strict_checkpoint, alone)


def test_count_tokens_equals_the_requests_input_tokens(client: anthropic.Anthropic) -> None:
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "The user wants weather.", "signature": "sig"},
                {"type": "redacted_thinking", "data": "opaque"},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "21 C"}],
        },
    ]
    cases = [
        {"messages": ASK},
        {"messages": ASK, "system": [{"type": "text", "text": "Be brief."}]},
        {"messages": history, "tools": [WEATHER], "system": "Use tools."},
        {"messages": MID_SYSTEM, "thinking": {"type": "disabled"}},
    ]
    for fields in cases:
        message = create(client, max_tokens=2, **fields)
        counted = client.messages.count_tokens(model="claude-test-1", **fields)
        assert counted.input_tokens == message.usage.input_tokens > 0, fields


def test_count_tokens_refuses_bad_input_like_messages(server: RunningServer) -> None:
    for body, status, param in [
        ({"model": "qwen"}, 400, "messages"),
        ({"model": "qwen", "messages": [{"role": "tool", "content": "x"}]}, 400, "messages.0"),
        ({"model": "nope", "messages": ASK}, 404, None),
        ({"model": "qwen", "messages": [{"role": "assistant", "content": "Hi"}]}, 400, None),
    ]:
        reply = count(server, body)
        assert reply.status_code == status, reply.text
        error = reply.json()["error"]
        assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
        assert param is None or error["message"].startswith(param), error


def test_a_prompt_too_long_is_anthropics_error(server: RunningServer) -> None:
    long = [{"role": "user", "content": "word " * 6000}]
    tokens = count(server, {"model": "qwen", "messages": long}).json()["input_tokens"]
    assert tokens > CONTEXT
    reply = post(server, "/v1/messages", json={"model": "qwen", "max_tokens": 4, "messages": long})
    assert reply.status_code == 400
    assert reply.json() == {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": f"prompt is too long: {tokens} tokens > {CONTEXT} maximum",
        },
    }
    # far too long to be tokenized at all: the tokens it has at least
    huge = [{"role": "user", "content": "x" * (CONTEXT * 40)}]
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        body = {"model": "qwen", "max_tokens": 4, "messages": huge}
        message = post(server, path, json=body).json()["error"]["message"]
        found = re.fullmatch(rf"prompt is too long: (\d+) tokens > {CONTEXT} maximum", message)
        assert found and int(found[1]) > CONTEXT, message
    # the OpenAI APIs keep their own wording
    chat = {"model": "qwen", "max_tokens": 4, "messages": long}
    reply = post(server, "/v1/chat/completions", json=chat)
    assert reply.status_code == 400
    assert reply.json()["error"]["code"] == "context_length_exceeded"
    assert reply.json()["error"]["message"].startswith(f"this model's context is {CONTEXT}")


def test_input_and_max_tokens_over_the_context_is_anthropics_error(
    server: RunningServer, client: anthropic.Anthropic
) -> None:
    tokens = client.messages.count_tokens(model="qwen", messages=ASK).input_tokens
    reply = post(
        server, "/v1/messages", json={"model": "qwen", "max_tokens": 5000, "messages": ASK}
    )
    assert reply.status_code == 400
    assert reply.json() == {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": (
                f"input length and `max_tokens` exceed context limit: {tokens} + 5000 > "
                f"{CONTEXT}, decrease input length or `max_tokens` and try again"
            ),
        },
    }
    with pytest.raises(anthropic.BadRequestError):
        create(client, max_tokens=CONTEXT)


def test_head_answers_like_get_without_a_body(server: RunningServer) -> None:
    for path in ("/", "/health"):
        got = httpx.get(server.url + path, timeout=30)
        head = httpx.head(server.url + path, timeout=30)
        assert head.status_code == got.status_code == 200, path
        assert head.content == b"" and got.content
        assert head.headers["content-type"] == got.headers["content-type"]
    # a web page's HEAD from another origin changes nothing: it is not refused either
    foreign = {"Origin": "https://elsewhere.example", "Sec-Fetch-Site": "cross-site"}
    assert httpx.head(server.url + "/health", headers=foreign, timeout=30).status_code == 200


def test_beta_headers_and_query_are_accepted(server: RunningServer) -> None:
    beta = {"anthropic-beta": "mid-conversation-system-2026-04-07,interleaved-thinking-2025-05-14"}
    body = {"model": "qwen", "max_tokens": 2, "messages": MID_SYSTEM}
    for path in ("/v1/messages?beta=true", "/v1/messages/count_tokens?beta=true"):
        reply = post(server, path, json=body, headers=beta | {"anthropic-version": "2023-06-01"})
        assert reply.status_code == 200, reply.text
    client = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)
    message = client.beta.messages.create(
        model="qwen",
        max_tokens=2,
        messages=MID_SYSTEM,
        betas=["mid-conversation-system-2026-04-07"],
    )
    counted = client.beta.messages.count_tokens(
        model="qwen", messages=MID_SYSTEM, betas=["mid-conversation-system-2026-04-07"]
    )
    assert message.usage.input_tokens == counted.input_tokens


def test_model_patterns_map_unknown_names(client: anthropic.Anthropic) -> None:
    message = create(client, model="claude-opus-4-8", max_tokens=2)
    assert message.model == "qwen"
    assert client.messages.count_tokens(model="claude-sonnet-5", messages=ASK).input_tokens > 0
    with pytest.raises(anthropic.NotFoundError):
        create(client, model="gpt-opus-4-8")


def test_a_stream_starts_before_a_long_prefill_ends(
    server: RunningServer, client: anthropic.Anthropic, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client's timeout for the response's headers (Claude Code's is 600 s) must not end a
    prompt whose prefill takes longer: past a short wait the stream starts, and pings (an SSE
    comment on OpenAI's APIs) keep it alive until the first token; the reply is the same."""
    from mlxserve.server import streaming

    monkeypatch.setattr(streaming, "FIRST_ITEM_WAIT_S", 0.0)
    monkeypatch.setattr(streaming, "KEEPALIVE_S", 0.001)
    long = [{"role": "user", "content": "tell me more " * 400}]
    body = {"model": "qwen", "max_tokens": 8, "messages": long, "stream": True, **GREEDY}
    with httpx.stream("POST", server.url + "/v1/messages", json=body, timeout=60) as raw:
        lines = list(raw.iter_lines())
    assert lines.count("event: ping") >= 2  # message_start's, and one while the prefill ran
    streamed = create(client, messages=long, max_tokens=8, stream=True)
    text = "".join(e.delta.text for e in streamed if e.type == "content_block_delta")
    assert text == "".join(b.text for b in create(client, messages=long, max_tokens=8).content)
    chat = {"model": "qwen", "max_tokens": 8, "messages": long, "stream": True, **GREEDY}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=chat, timeout=60) as raw:
        assert ": keep-alive" in list(raw.iter_lines())
    openai_client = openai.OpenAI(base_url=server.url + "/v1", api_key="x")
    chunks = openai_client.chat.completions.create(**chat)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
