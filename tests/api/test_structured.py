"""Structured output: response_format by grammar-constrained decoding, on a real server.

The tiny checkpoints talk gibberish, so any valid JSON they produce is the grammar's doing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from mlx_lm.utils import load_tokenizer

from .server import RunningServer, running_server, write_config
from .test_distributed import config_text, launched

FAMILIES = ["llama", "qwen", "mistral", "deepseek"]
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "kind": {"enum": ["cat", "dog", "fox"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {
            "type": "array",
            "items": {"type": "string", "maxLength": 5},
            "minItems": 1,
            "maxItems": 3,
        },
        "owner": {
            "type": "object",
            "properties": {
                "id": {"type": "integer", "minimum": 1, "maximum": 999},
                "active": {"type": "boolean"},
            },
            "required": ["id", "active"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "kind", "age", "tags", "owner"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "pet", "schema": SCHEMA, "strict": True},
}
MESSAGES = [{"role": "user", "content": "Describe a pet as JSON."}]
MAX_TOKENS = 400  # far more than the schema's longest value takes
SAMPLINGS = [(0.0, None), (1.0, 1), (1.0, 2), (0.7, 3)]


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, tiny_checkpoints: dict[str, Path]
) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("structured")
    models = "".join(f'[models.{f}]\nsource = "{tiny_checkpoints[f]}"\n' for f in FAMILIES)
    text = (
        f'[registry]\ndefault_model = "llama"\ncache_dir = "{tmp / "cache"}"\n'
        f"max_loaded_models = 4\n{models}"
    )
    with running_server(write_config(tmp, text)) as running:
        yield running


def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def chat(
    server: RunningServer, model: str, stream: bool = False, **params: Any
) -> tuple[str, str | None]:
    """The text and finish reason of a chat completion, streamed or not."""
    params = {"max_tokens": MAX_TOKENS, "response_format": RESPONSE_FORMAT} | params
    api = client(server).chat.completions
    if not stream:
        choice = api.create(model=model, messages=MESSAGES, **params).choices[0]
        return choice.message.content or "", choice.finish_reason
    text, reason = "", None
    for chunk in api.create(model=model, messages=MESSAGES, stream=True, **params):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            reason = choice.finish_reason or reason
    return text, reason


@pytest.mark.parametrize("family", FAMILIES)
def test_json_schema_output_always_validates(server: RunningServer, family: str) -> None:
    for stream in (False, True):
        for temperature, seed in SAMPLINGS:
            text, reason = chat(server, family, stream, temperature=temperature, seed=seed)
            assert reason == "stop", (stream, temperature, text)
            jsonschema.validate(json.loads(text), SCHEMA)


def test_sampling_parameters_apply_after_the_grammar(server: RunningServer) -> None:
    params = {
        "temperature": 1.3,
        "top_p": 0.9,
        "extra_body": {"top_k": 20, "repetition_penalty": 1.2},
        "presence_penalty": 1.0,
        "frequency_penalty": 0.5,
        "logit_bias": {"5": 50.0, "6": -50.0},
        "logprobs": True,
        "top_logprobs": 5,
        "seed": 7,
    }
    response = client(server).chat.completions.create(
        model="qwen",
        messages=MESSAGES,
        max_tokens=MAX_TOKENS,
        response_format=RESPONSE_FORMAT,
        **params,
    )
    choice = response.choices[0]
    jsonschema.validate(json.loads(choice.message.content or ""), SCHEMA)
    assert choice.logprobs is not None and choice.logprobs.content
    for entry in choice.logprobs.content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) <= 5
        assert entry.logprob >= min(top.logprob for top in entry.top_logprobs)


def test_text_completions_take_a_response_format(server: RunningServer) -> None:
    for stream in (False, True):
        body = {
            "model": "mistral",
            "prompt": "A pet:",
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "extra_body": {"response_format": RESPONSE_FORMAT},
            "stream": stream,
        }
        if stream:
            text, reason = "", None
            for chunk in client(server).completions.create(**body):
                text += chunk.choices[0].text
                reason = chunk.choices[0].finish_reason or reason
        else:
            choice = client(server).completions.create(**body).choices[0]
            text, reason = choice.text, choice.finish_reason
        assert reason == "stop"
        jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_output_is_an_object(
    server: RunningServer, tiny_checkpoints: dict[str, Path]
) -> None:
    for family in FAMILIES:
        tokenizer = load_tokenizer(tiny_checkpoints[family])
        # Any object is allowed, and gibberish never closes one: nudge it to close strings
        # and objects (the grammar still decides where they may close).
        (quote,), (brace,) = tokenizer.encode('"'), tokenizer.encode("}")
        for temperature, seed in SAMPLINGS:
            text, reason = chat(
                server,
                family,
                response_format={"type": "json_object"},
                temperature=temperature,
                seed=seed,
                logit_bias={str(quote): 12, str(brace): 10},
            )
            assert reason == "stop", text
            assert isinstance(json.loads(text), dict)


def test_text_format_leaves_output_free(server: RunningServer) -> None:
    free, _ = chat(server, "llama", response_format={"type": "text"}, temperature=0, max_tokens=20)
    plain, _ = chat(server, "llama", response_format=None, temperature=0, max_tokens=20)
    assert free == plain


def _one(server: RunningServer, index: int) -> str:
    if index % 2:
        return chat(server, "llama", temperature=0)[0]
    return chat(server, "llama", response_format=None, temperature=0, max_tokens=40)[0]


def test_constrained_and_free_requests_batch_together(server: RunningServer) -> None:
    alone = [_one(server, i) for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda i: _one(server, i), range(6)))
    assert together == alone
    for text in alone[1::2]:
        jsonschema.validate(json.loads(text), SCHEMA)


def test_the_prefix_cache_keeps_constrained_output_the_same(server: RunningServer) -> None:
    long_messages = [{"role": "user", "content": "Describe a pet as JSON. " * 12}]
    first = client(server).chat.completions.create(
        model="qwen",
        messages=long_messages,
        max_tokens=MAX_TOKENS,
        temperature=0,
        response_format=RESPONSE_FORMAT,
    )
    again = client(server).chat.completions.create(
        model="qwen",
        messages=long_messages,
        max_tokens=MAX_TOKENS,
        temperature=0,
        response_format=RESPONSE_FORMAT,
    )
    assert again.usage.prompt_tokens_details.cached_tokens > 0
    assert again.choices[0].message.content == first.choices[0].message.content
    jsonschema.validate(json.loads(first.choices[0].message.content or ""), SCHEMA)


@pytest.mark.parametrize(
    "response_format, problem",
    [
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}},
            "strin",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nope"}}},
            "nope",
        ),
        ({"type": "xml"}, "xml"),
        ({"type": "json_schema"}, "json_schema"),
        ({"type": "json_schema", "json_schema": {"schema": [1]}}, "schema"),
    ],
)
def test_a_schema_that_cannot_compile_is_a_400(
    server: RunningServer, response_format: dict[str, Any], problem: str
) -> None:
    for path, body in [
        ("/v1/chat/completions", {"messages": MESSAGES}),
        ("/v1/completions", {"prompt": "x"}),
    ]:
        body |= {"model": "llama", "response_format": response_format}
        response = httpx.post(server.url + path, json=body, timeout=60)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error"
        assert error["param"] == "response_format"
        assert problem in error["message"]


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
    text = config_text(tmp_path, tiny_checkpoints["qwen"], f'strategy = "{strategy}"\n')
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
