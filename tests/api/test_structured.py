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
import pytest
from mlx_lm.utils import load_tokenizer

from ..support.server import RunningServer, running_server, write_config
from ..support.structured import MAX_TOKENS, MESSAGES, RESPONSE_FORMAT, SCHEMA, chat, client

FAMILIES = ["llama", "qwen", "mistral", "deepseek"]
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
