"""JSON schemas cannot take the server down (issue 16, items 1, 4 and 8).

A schema whose ``$ref`` chain is 3,000 long overflowed the compiling thread's stack and ended
the process with SIGSEGV; an ``x-guidance`` that is not an object was a 500; a schema that
requires itself compiled, then failed mid-decoding with a 500. The server tests run a real
``mlxserve serve`` process on 127.0.0.1 (so the crash shows as a dead server, not a dead
test run), through the official openai client and httpx; the compile tests run in fresh
interpreters. (The limits themselves and the compile pool: unit/test_schema_limits.py.)
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from mlxserve.plugins.tiny import write_tiny_checkpoint

from ..support import REPO
from ..support.processes import Served, served
from ..support.schemas import MUTUAL_REQUIRED, SELF_REQUIRED, TREE, chain

CONTEXT = 131072  # room for a 105 KB tool schema in the prompt (the tools path)
ASK = [{"role": "user", "content": "Say something."}]
CRASHER = chain(3000)  # ~105 KB; SIGSEGV in a default-stack thread before the fix
X_GUIDANCE = {
    "top-level string": {"type": "object", "x-guidance": "compact"},
    "top-level list": {"type": "object", "x-guidance": [1]},
    "top-level null": {"type": "object", "x-guidance": None},
    "nested property": {
        "type": "object",
        "properties": {"a": {"type": "integer", "x-guidance": 5}},
    },
    "in $defs": {"$ref": "#/$defs/a", "$defs": {"a": {"type": "integer", "x-guidance": True}}},
}


# ---- a real server process ------------------------------------------------------------


@pytest.fixture(scope="module")
def long_llama(tmp_path_factory: pytest.TempPathFactory, plugins) -> Path:
    dest = tmp_path_factory.mktemp("grammar-safety") / "llama"
    overrides = {"max_position_embeddings": CONTEXT}
    return write_tiny_checkpoint(plugins.family("llama"), dest, overrides=overrides)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, long_llama: Path) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("grammar-server")
    context = f"[kv_cache]\nmax_sequence_length = {CONTEXT}\n"
    with served(tmp, long_llama, extra=context) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def greedy(client: openai.OpenAI) -> str:
    reply = client.chat.completions.create(
        model="m", messages=ASK, max_tokens=24, temperature=0, extra_body={"ignore_eos": True}
    )
    return reply.choices[0].message.content or ""


@pytest.fixture(scope="module")
def baseline(client: openai.OpenAI) -> str:
    return greedy(client)


def still_serving(server: Served, client: openai.OpenAI, baseline: str) -> None:
    assert server.alive(), f"the server died:\n{server.log.read_text()[-3000:]}"
    assert greedy(client) == baseline


# ---- every surface a schema reaches the compiler by -------------------------------------


def response_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema}}


def chat_tool(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": "act", "parameters": schema}}


Surface = Callable[[dict[str, Any]], tuple[str, dict[str, Any]]]
SURFACES: dict[str, tuple[Surface, str]] = {  # name -> (path and body, the param named)
    "chat response_format": (
        lambda s: (
            "/v1/chat/completions",
            {"messages": ASK, "response_format": response_format(s)},
        ),
        "response_format",
    ),
    "completions response_format": (
        lambda s: ("/v1/completions", {"prompt": "Hi", "response_format": response_format(s)}),
        "response_format",
    ),
    "responses text.format": (
        lambda s: (
            "/v1/responses",
            {"input": "Hi", "text": {"format": {"type": "json_schema", "name": "o", "schema": s}}},
        ),
        "text.format",
    ),
    "chat tool_choice required": (
        lambda s: (
            "/v1/chat/completions",
            {"messages": ASK, "tools": [chat_tool(s)], "tool_choice": "required"},
        ),
        "tools[0].function.parameters",
    ),
    "chat tool_choice named": (
        lambda s: (
            "/v1/chat/completions",
            {
                "messages": ASK,
                "tools": [
                    {"type": "function", "function": {"name": "other", "parameters": {}}},
                    chat_tool(s),
                ],
                "tool_choice": {"type": "function", "function": {"name": "act"}},
            },
        ),
        "tools[1].function.parameters",
    ),
    "responses tool_choice required": (
        lambda s: (
            "/v1/responses",
            {
                "input": "Hi",
                "tools": [{"type": "function", "name": "act", "parameters": s}],
                "tool_choice": "required",
            },
        ),
        "tools[0].function.parameters",
    ),
    "messages tool_choice any": (
        lambda s: (
            "/v1/messages",
            {
                "messages": ASK,
                "max_tokens": 16,
                "tools": [{"name": "act", "input_schema": s}],
                "tool_choice": {"type": "any"},
            },
        ),
        "tools[0].function.parameters",
    ),
    "messages tool_choice tool": (
        lambda s: (
            "/v1/messages",
            {
                "messages": ASK,
                "max_tokens": 16,
                "tools": [{"name": "act", "input_schema": s}],
                "tool_choice": {"type": "tool", "name": "act"},
            },
        ),
        "tools[0].function.parameters",
    ),
}


def refused(server: Served, surface: str, schema: dict[str, Any]) -> str:
    """Send ``schema`` by ``surface``; assert a 400 naming the right param; its message."""
    build, param = SURFACES[surface]
    path, body = build(schema)
    response = httpx.post(
        server.url + path, json={"model": "m", "max_tokens": 16, **body}, timeout=60
    )
    assert response.status_code == 400, response.text[:500]
    error = response.json()["error"]
    if path == "/v1/messages":  # Anthropic's shape: no param field, the message names it
        assert response.json()["type"] == "error"
        assert error["message"].startswith(param)
    else:
        assert error["param"] == param
    return error["message"]


@pytest.mark.parametrize("surface", list(SURFACES))
def test_a_deep_ref_chain_is_a_400_on_every_surface_and_the_server_lives(
    server: Served, client: openai.OpenAI, baseline: str, surface: str
) -> None:
    message = refused(server, surface, CRASHER)
    assert "too deep" in message and "(the limit is 400)" in message
    still_serving(server, client, baseline)


def test_the_official_client_sees_a_400_naming_the_param(
    server: Served, client: openai.OpenAI, baseline: str
) -> None:
    with pytest.raises(openai.BadRequestError) as chat:
        client.chat.completions.create(
            model="m", messages=ASK, response_format=response_format(CRASHER)
        )
    assert chat.value.param == "response_format"
    with pytest.raises(openai.BadRequestError) as responses:
        client.responses.create(
            model="m",
            input="Hi",
            text={"format": {"type": "json_schema", "name": "o", "schema": CRASHER}},
        )
    assert responses.value.param == "text.format"
    still_serving(server, client, baseline)


def test_a_stream_beside_the_crasher_finishes_with_done(
    server: Served, client: openai.OpenAI, baseline: str
) -> None:
    lines: list[str] = []
    started = threading.Event()

    def stream() -> None:
        body = {
            "model": "m",
            "messages": ASK,
            "max_tokens": 300,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
        with httpx.stream(
            "POST", server.url + "/v1/chat/completions", json=body, timeout=60
        ) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    lines.append(line.removeprefix("data: "))
                    started.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert started.wait(30)
    for surface in ("chat response_format", "chat tool_choice required"):
        refused(server, surface, CRASHER)
    reader.join(60)
    assert lines[-1] == "[DONE]"
    assert not any('"error"' in line for line in lines)
    still_serving(server, client, baseline)


@pytest.mark.parametrize("variant", list(X_GUIDANCE))
@pytest.mark.parametrize(
    "surface",
    [
        "chat response_format",
        "responses text.format",
        "chat tool_choice required",
        "chat tool_choice named",
        "messages tool_choice any",
    ],
)
def test_an_x_guidance_that_is_not_an_object_is_a_400(
    server: Served, surface: str, variant: str
) -> None:
    message = refused(server, surface, X_GUIDANCE[variant])
    assert "x-guidance must be an object" in message


def test_x_guidance_options_and_a_property_named_x_guidance_still_work(
    server: Served, client: openai.OpenAI, baseline: str
) -> None:
    schema = {
        "type": "object",
        "properties": {"x-guidance": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["x-guidance"],
        "additionalProperties": False,
        "x-guidance": {"whitespace_flexible": False},
    }
    reply = client.chat.completions.create(
        model="m", messages=ASK, response_format=response_format(schema), max_tokens=40
    )
    assert set(json.loads(reply.choices[0].message.content or "")) == {"x-guidance"}
    with pytest.raises(openai.BadRequestError, match="x-guidance must be an object"):
        client.chat.completions.create(
            model="m",
            messages=ASK,
            response_format=response_format(schema | {"x-guidance": "compact"}),
        )
    still_serving(server, client, baseline)


@pytest.mark.parametrize("schema", [SELF_REQUIRED, MUTUAL_REQUIRED], ids=["self", "mutual"])
@pytest.mark.parametrize(
    "surface",
    [
        "chat response_format",
        "responses text.format",
        "chat tool_choice required",
        "messages tool_choice tool",
    ],
)
def test_a_schema_that_requires_itself_is_a_400_naming_the_problem(
    server: Served, surface: str, schema: dict[str, Any]
) -> None:
    message = refused(server, surface, schema)
    assert "admits no finite value" in message
    assert "Too many items" not in message and "<state>" not in message


def test_a_recursive_schema_that_can_end_works_and_one_that_cannot_is_refused(
    server: Served, client: openai.OpenAI, baseline: str
) -> None:
    for seed in range(3):
        reply = client.chat.completions.create(
            model="m",
            messages=ASK,
            response_format=response_format(TREE),
            max_tokens=400,
            temperature=1.0,
            seed=seed,
        )
        assert reply.choices[0].finish_reason == "stop"
        assert "name" in json.loads(reply.choices[0].message.content or "")
    with pytest.raises(openai.BadRequestError, match="admits no finite value") as refused:
        client.chat.completions.create(
            model="m", messages=ASK, response_format=response_format(SELF_REQUIRED)
        )
    assert refused.value.param == "response_format"
    still_serving(server, client, baseline)


# A grammar llguidance gives up on while decoding (its lexer's limit on one regex's states):
# no limit here foresees it, so it must end that request alone, as a 4xx.
HOPELESS_PATTERN = {
    "type": "object",
    "properties": {"s": {"type": "string", "pattern": "^(a{1000}){1000}$"}},
    "required": ["s"],
}


def request_errors(server: Served, kind: str) -> float:
    lines = httpx.get(server.url + "/metrics", timeout=30).text.splitlines()
    return sum(
        float(line.split()[-1])
        for line in lines
        if line.startswith("mlxserve_request_errors_total{") and f'kind="{kind}"' in line
    )


def test_a_grammar_that_fails_while_decoding_is_a_clean_4xx_for_that_request_alone(
    server: Served, client: openai.OpenAI, baseline: str
) -> None:
    failed_before = request_errors(server, "generation_failed")
    format_before = request_errors(server, "output_format_failed")
    with pytest.raises(openai.BadRequestError) as failed:
        client.chat.completions.create(
            model="m", messages=ASK, response_format=response_format(HOPELESS_PATTERN)
        )
    assert failed.value.code == "output_format_failed"
    assert "<state>" not in str(failed.value)
    body = {
        "model": "m",
        "messages": ASK,
        "stream": True,
        "response_format": response_format(HOPELESS_PATTERN),
    }
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        status, lines = r.status_code, [line for line in r.iter_lines() if line.strip()]
    if status == 200:  # the failure came after the first token: an error event, then [DONE]
        assert lines[-1] == "data: [DONE]"
        error = json.loads(lines[-2].removeprefix("data: "))["error"]
        assert error["code"] == "output_format_failed"
    else:
        assert status == 400
    assert request_errors(server, "output_format_failed") == format_before + 2
    assert request_errors(server, "generation_failed") == failed_before  # not a server fault
    still_serving(server, client, baseline)


# ---- compiling on large stacks, each in a fresh interpreter -------------------------------


def run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def test_the_compile_threads_survive_the_crash_case_even_past_the_limits(
    tiny_checkpoints: dict[str, Path],
) -> None:
    """The large stack is a line of its own: the 3,000 chain (which crashes a default
    thread) compiles through compile_constraint, with the limits not consulted at all."""
    result = run_python(
        f"""
        import asyncio, json
        from mlx_lm.utils import load_tokenizer
        from mlxserve.core.sampling.constraint import compile_constraint, json_grammar
        defs = {{f"d{{i}}": {{"$ref": f"#/$defs/d{{i + 1}}"}} for i in range(3000)}}
        defs["d3000"] = {{"type": "integer"}}
        grammar = json_grammar({{"$ref": "#/$defs/d0", "$defs": defs}})
        tokenizer = load_tokenizer({str(tiny_checkpoints["llama"])!r})
        constraint = asyncio.run(compile_constraint(tokenizer, 512, grammar))
        print("compiled", not constraint.is_error)
        """
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "compiled True" in result.stdout


def test_the_deepest_schemas_allowed_compile_and_decode_on_small_stacks(
    tiny_checkpoints: dict[str, Path],
) -> None:
    """At the depth limit, a compile fits a 4 MiB thread stack (half the usual default), and
    the masks of llguidance's own threads follow the deepest output to its end."""
    result = run_python(
        f"""
        import json, threading
        import numpy as np
        from mlx_lm.utils import load_tokenizer
        from mlxserve.core.sampling.constraint import Constraint, compute_masks, grammar_tokenizer
        from mlxserve.core.sampling.constraint import json_grammar
        from mlxserve.core.sampling.grammar_limits import (
            MAX_SCHEMA_DEPTH, check_schema, SchemaError,
        )

        def deepest(shape):
            best = None
            for n in range(1, MAX_SCHEMA_DEPTH + 1):
                defs = {{f"d{{i}}": shape(i) for i in range(n)}}
                defs[f"d{{n}}"] = {{"type": "integer"}}
                schema = {{"$ref": "#/$defs/d0", "$defs": defs}}
                try:
                    check_schema(schema)
                except SchemaError:
                    return best
                best = (n, schema)
            return best

        nxt = lambda i: f"#/$defs/d{{i + 1}}"
        shapes = {{
            "chain": lambda i: {{"$ref": nxt(i)}},
            "objects": lambda i: {{"type": "object", "properties": {{"a": {{"$ref": nxt(i)}}}},
                                  "required": ["a"]}},
            "arrays": lambda i: {{"type": "array", "items": {{"$ref": nxt(i)}}, "minItems": 1,
                                 "maxItems": 1}},
            "anyOf": lambda i: {{"type": "object", "properties": {{"a": {{"anyOf": [
                {{"$ref": nxt(i)}}, {{"type": "null"}}]}}}}, "required": ["a"]}},
            "allOf": lambda i: {{"allOf": [{{"$ref": nxt(i)}}, {{"type": ["object", "integer"]}}]}},
        }}
        tokenizer = load_tokenizer({str(tiny_checkpoints["llama"])!r})
        ll = grammar_tokenizer(tokenizer, 512)
        out = {{}}

        def compile_all():
            for name, shape in shapes.items():
                n, schema = deepest(shape)
                out[name] = (n, Constraint(ll, json_grammar(schema)))

        threading.stack_size(4 * 2**20)
        worker = threading.Thread(target=compile_all)
        worker.start()
        worker.join()
        n, constraint = out["objects"]
        text = '{{"a": ' * n + "1" + "}}" * n
        for token in tokenizer._tokenizer.encode(text, add_special_tokens=False):
            masks = compute_masks([constraint])
            bits = np.unpackbits(masks.view(np.uint8), axis=1, bitorder="little")[0]
            assert bits[token], token
            constraint.consume(token)
        print("levels", {{k: v[0] for k, v in out.items()}}, "done", constraint.done)
        """
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "done True" in result.stdout, result.stdout
