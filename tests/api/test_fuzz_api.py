"""Property-based fuzzing of the whole API against a real server on 127.0.0.1.

- schemathesis generates requests, valid and invalid, for every operation of the OpenAPI schema
  the server itself serves (behind its API key), with the key, without it or with a wrong one;
- hand-written hypothesis strategies send hostile JSON into the free-form fields (JSON schemas
  in ``response_format``, ``text.format``, tools' ``parameters`` and ``input_schema``, tool
  choices) and odd numbers (NaN, infinities, huge integers) into the sampling fields;
- raw requests carry odd ``Host``, ``Origin``, ``Content-Type`` and ``Sec-Fetch-Site`` headers
  to the HTTP edge.

Whatever comes in: no response is a 5xx (nor a stream's error event of the server's kind),
every error has OpenAI's shape (Anthropic's under /v1/messages), and afterwards the server
answers a fixed greedy request with the same text as before, with no 5xx and no failed request
counted in /metrics. The only answer not from the app is uvicorn's plain 400 to bytes that are
not HTTP.

Bounded for the suite: ``EXAMPLES`` cases per operation or field, at most ``MAX_TOKENS``
generated tokens per request, about a minute on 2 cores. Under ``CI`` hypothesis derandomizes
(its ``ci`` profile), so a run is reproducible; locally each run explores new inputs, and
``FUZZ_EXAMPLES=500`` makes a deeper run.
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import response_schema_conformance

from ..support.server import RunningServer, running_server, write_config

KEY = "sk-fuzz-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "m"
MAX_TOKENS = 4  # the most tokens a fuzzed request may ask for: generation stays cheap
# cases per operation (schemathesis), per free-form field (hostile JSON) and for the headers
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "50"))
MAX_REQUEST_BYTES = 256 * 2**10
FIXED = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 12, "temperature": 0}
TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")

# Every operation of the API. A new one must be added here (a test checks the list is whole),
# so no endpoint escapes the fuzzing.
OPERATIONS = (
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/responses"),
    ("POST", "/v1/messages"),
    ("POST", "/v1/messages/count_tokens"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model_id}"),
    ("GET", "/admin/models"),
    ("POST", "/admin/models/{name}/load"),
    ("POST", "/admin/models/{name}/unload"),
    ("GET", "/health"),
    ("GET", "/"),
    ("GET", "/metrics"),
)

# mostly the key, as either header; now and then none or a wrong one (a 401 is checked too)
CREDENTIALS = st.sampled_from(
    [AUTH] * 6 + [{"x-api-key": KEY}, {}, {"Authorization": "Bearer wrong"}, {"x-api-key": "é"}]
)

FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@pytest.fixture(scope="module")
def fuzz_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_checkpoints
) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("fuzz")
    config = write_config(
        tmp,
        f"""
[server]
api_keys = ["{KEY}"]
max_request_bytes = {MAX_REQUEST_BYTES}
[registry]
default_model = "{MODEL}"
cache_dir = "{tmp / "cache"}"
[models.{MODEL}]
source = "{tiny_checkpoints["llama"]}"
max_tokens = {MAX_TOKENS}
[kv_cache]
max_sequence_length = 2048
""",
    )
    with running_server(config) as running:
        yield running


@pytest.fixture(scope="module")
def http(fuzz_server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fuzz_server.url, headers=AUTH, timeout=60) as client:
        yield client


def greedy_text(http: httpx.Client) -> str:
    response = http.post("/v1/completions", json=FIXED)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


@pytest.fixture(scope="module")
def before(http: httpx.Client) -> str:
    """The fixed request's answer before any fuzzing."""
    return greedy_text(http)


@pytest.fixture(scope="module")
def api_schema(fuzz_server: RunningServer, before: str) -> schemathesis.BaseSchema:
    """The schema as the server serves it (behind the API key, like the API)."""
    config = schemathesis.Config.from_dict({"headers": AUTH, "request-timeout": 60})
    return schemathesis.openapi.from_url(
        fuzz_server.url + "/openapi.json", config=config, headers=AUTH, timeout=30
    )


# --- the checks --------------------------------------------------------------------------------


def anthropic_path(path: str) -> bool:
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def error_shape_problem(path: str, status: int, body: Any) -> str | None:
    """Why an error body does not have the API's error shape (None: it has)."""
    error = body.get("error") if isinstance(body, dict) else None
    if anthropic_path(path):
        ok = (
            body.get("type") == "error"  # type: ignore[union-attr]
            and isinstance(error, dict)
            and isinstance(error.get("type"), str)
            and isinstance(error.get("message"), str)
        )
        return None if ok else f"{status} is not Anthropic-shaped: {body!r:.300}"
    ok = (
        isinstance(error, dict)
        and {"message", "type", "param", "code"} <= error.keys()
        and isinstance(error["message"], str)
        and isinstance(error["type"], str)
    )
    return None if ok else f"{status} is not OpenAI-shaped: {body!r:.300}"


# what a stream's error event says when the server failed (a 5xx after the headers), as the
# OpenAI-style "type", Anthropic's "error.type" or the Responses API's "code"
SERVER_FAULTS = frozenset(
    {"server_error", "api_error", "overloaded_error", "generation_failed", "engine_unavailable"}
)


def stream_problem(text: str) -> str | None:
    """A stream's event that is not JSON, or that reports a server-side error."""
    for line in text.splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        try:
            event = json.loads(line.removeprefix("data: "))
        except ValueError:
            return f"a stream event is not JSON: {line[:200]!r}"
        if not isinstance(event, dict):
            continue
        error = event.get("error")
        kinds = {event.get("code")} if event.get("type") == "error" else set()
        if isinstance(error, dict):
            kinds |= {error.get("type"), error.get("code")}
        if kinds & SERVER_FAULTS:
            return f"the stream ended in a server error: {line[:300]}"
    return None


def check_response(path: str, status: int, content_type: str, text: str, request: str) -> None:
    where = f"\nrequest: {request[:2000]}"
    assert status < 500, f"{status}: {text[:1000]}{where}"
    if status >= 400:
        try:
            body = json.loads(text)
        except ValueError:
            pytest.fail(f"{status} without a JSON body: {text[:300]!r}{where}")
        problem = error_shape_problem(path, status, body)
        assert problem is None, problem + where
    elif content_type.startswith("text/event-stream"):
        problem = stream_problem(text)
        assert problem is None, problem + where


# --- schemathesis: every operation -------------------------------------------------------------


def _header(headers: dict[str, list[str]], name: str) -> str:
    return next((v[0] for k, v in headers.items() if k.lower() == name and v), "")


def capped(body: Any) -> Any:
    """``body`` asking for at most MAX_TOKENS tokens (a value of a wrong type stays as it is)."""
    if isinstance(body, dict):
        for field in TOKEN_FIELDS:
            value = body.get(field)
            if isinstance(value, int) and not isinstance(value, bool) and value > MAX_TOKENS:
                body[field] = MAX_TOKENS
    return body


def _integral(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    if isinstance(value, list):
        return [_integral(item) for item in value]
    if isinstance(value, dict):
        return {key: _integral(item) for key, item in value.items()}
    return value


def tidy(body: dict[str, Any], named: set[str]) -> dict[str, Any]:
    """``body`` more likely to pass validation and reach the engine: only the top-level keys
    the schema ``named`` (the server ignores the others anyway), and no integers written as
    floats (``5.0``, an integer to JSON Schema, which the strict wire schemas refuse)."""
    return {key: _integral(value) for key, value in body.items() if key in named}


def body_properties(raw: dict[str, Any], method: str, path: str) -> set[str]:
    """The top-level properties the raw OpenAPI schema names for an operation's JSON body."""
    body = raw["paths"][path][method.lower()].get("requestBody", {})
    ref = body.get("content", {}).get("application/json", {}).get("schema", {}).get("$ref", "")
    component = raw["components"]["schemas"].get(ref.rsplit("/", 1)[-1], {}) if ref else {}
    return set(component.get("properties", {}))


def test_every_operation_is_fuzzed(api_schema: schemathesis.BaseSchema) -> None:
    served = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert served == set(OPERATIONS)


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_fuzz_operation(
    api_schema: schemathesis.BaseSchema, fuzz_server: RunningServer, method: str, path: str
) -> None:
    operation = api_schema[path][method]
    named = body_properties(api_schema.raw_schema, method, path)
    strategy = operation.as_strategy(generation_mode=GenerationMode.POSITIVE)
    if operation.body:  # invalid bodies too (a path parameter of any string has no invalid one)
        strategy |= operation.as_strategy(generation_mode=GenerationMode.NEGATIVE)

    @FUZZ_SETTINGS
    @given(case=strategy, data=st.data())
    def fuzz(case: schemathesis.Case, data: st.DataObject) -> None:
        if isinstance(case.body, dict):
            if data.draw(st.booleans(), label="tidy"):
                case.body = tidy(case.body, named)
            case.body = capped(case.body)
            # a random model name is a 404 before any work: usually ask for the served one
            if "model" in case.body and data.draw(st.booleans(), label="served model"):
                case.body["model"] = MODEL
        for name in ("model_id", "name"):
            if name in case.path_parameters and data.draw(st.booleans(), label="served model"):
                case.path_parameters[name] = MODEL
        auth = data.draw(CREDENTIALS, label="credentials")
        response = case.call(base_url=fuzz_server.url, headers=auth, timeout=60)
        event(f"status {response.status_code}")
        check_response(
            case.formatted_path,
            response.status_code,
            _header(response.headers, "content-type"),
            response.text,
            case.as_curl_command(headers=auth),
        )
        if response.status_code < 300:  # an answer has the shape the schema promises
            case.validate_response(response, checks=[response_schema_conformance])

    fuzz()


# --- hostile JSON in the free-form fields ------------------------------------------------------

KEYWORDS = (
    "type", "properties", "items", "prefixItems", "$ref", "$defs", "definitions", "anyOf",
    "oneOf", "allOf", "not", "enum", "const", "required", "additionalProperties",
    "patternProperties", "propertyNames", "pattern", "format", "minimum", "maximum",
    "exclusiveMinimum", "multipleOf", "minLength", "maxLength", "minItems", "maxItems",
    "uniqueItems", "contains", "if", "then", "else", "x-guidance", "$schema", "$id", "$anchor",
    "name", "schema", "strict", "json_schema", "function", "parameters", "default",
)  # fmt: skip
TYPES = ("object", "array", "string", "integer", "number", "boolean", "null", "any", "")
REFS = ("#", "#/", "#/$defs/a", "#/$defs/b", "#/definitions/a", "#/properties/a", "a", "#a",
        "http://127.0.0.1:9/x.json", "file:///etc/passwd", "#/$defs/%ZZ", "#/items/0")  # fmt: skip
PATTERNS = ("(a+)+$", "[", "\\", "(?=a)", "^.{100000}$", "\\p{L}", "(?P<x>a)(?P=x)", "\\1", "")
FORMATS = ("date-time", "email", "uri", "uuid", "regex", "ipv4", "nonsense")

numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 2**31, 2**53 + 1, 2**63, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),  # NaN and Infinity: Python's json takes them
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    numbers,
    st.text(max_size=12),
    st.sampled_from(TYPES + REFS + PATTERNS + FORMATS),
)
keys = st.one_of(st.sampled_from(KEYWORDS), st.text(max_size=6))
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5),
    max_leaves=24,
)


def _schema_node(inner: st.SearchStrategy) -> st.SearchStrategy:
    """A node that looks like JSON Schema, with wrong values now and then."""
    return st.fixed_dictionaries(
        {},
        optional={
            "type": st.sampled_from(TYPES) | st.lists(st.sampled_from(TYPES), max_size=3) | scalars,
            "properties": st.dictionaries(st.text(max_size=4), inner, max_size=3) | scalars,
            "items": inner | st.booleans(),
            "prefixItems": st.lists(inner, max_size=3),
            "$ref": st.sampled_from(REFS) | scalars,
            "$defs": st.dictionaries(st.sampled_from(["a", "b", ""]), inner, max_size=2),
            "anyOf": st.lists(inner, max_size=3) | scalars,
            "oneOf": st.lists(inner, max_size=3),
            "allOf": st.lists(inner, max_size=3),
            "not": inner,
            "enum": st.lists(scalars, max_size=4) | scalars,
            "const": json_values,
            "required": st.lists(st.text(max_size=4), max_size=3) | scalars,
            "additionalProperties": inner | st.booleans(),
            "pattern": st.sampled_from(PATTERNS) | scalars,
            "format": st.sampled_from(FORMATS) | scalars,
            "minimum": numbers,
            "maximum": numbers,
            "minLength": numbers,
            "maxLength": numbers,
            "minItems": numbers,
            "maxItems": numbers,
            "x-guidance": json_values,
        },
    )


schema_like = st.recursive(st.booleans() | _schema_node(st.booleans()), _schema_node, max_leaves=8)
# (plus the shape that was a 500 on every API: an "x-guidance" that is not an object)
hostile = schema_like | json_values | st.just({"x-guidance": "not an object"})


CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def _chat_response_format(value: Any, wrap: int) -> dict[str, Any]:
    fmt = [
        {"type": "json_schema", "json_schema": {"name": "out", "schema": value}},
        {"type": "json_schema", "json_schema": value},
        value,
    ][wrap]
    return {**CHAT, "response_format": fmt}


def _chat_tools(value: Any, choice: Any) -> dict[str, Any]:
    return {
        **CHAT,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": value}}],
        "tool_choice": choice,
    }


def _responses_text(value: Any, wrap: int) -> dict[str, Any]:
    fmt = [{"type": "json_schema", "name": "out", "schema": value}, value, {"type": value}][wrap]
    return {"input": "hi", "text": {"format": fmt}}


def _responses_tools(value: Any, choice: Any) -> dict[str, Any]:
    return {
        "input": "hi",
        "tools": [{"type": "function", "name": "f", "parameters": value}],
        "tool_choice": choice,
    }


def _messages_tools(value: Any, choice: Any) -> dict[str, Any]:
    return {
        **CHAT,
        "tools": [{"name": "f", "input_schema": value}],
        "tool_choice": choice,
    }


def _sampling(fields: tuple[str, ...], base: dict[str, Any]) -> st.SearchStrategy:
    """``base`` with odd numbers (NaN, infinities, huge integers) in sampling fields."""
    optional = {name: numbers | scalars for name in fields}
    return st.fixed_dictionaries({}, optional=optional).map(lambda values: {**base, **values})


CHAT_SAMPLING = (
    "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "n", "top_logprobs",
)  # fmt: skip
bias_keys = st.sampled_from(["0", "1", "-1", "1e3", "99999999999", "x"])
TOKEN_LISTS = {
    "logit_bias": st.dictionaries(bias_keys, numbers, max_size=4),
    "stop_token_ids": st.lists(numbers, max_size=4),
}
wraps = st.integers(0, 2)
chat_choices = st.sampled_from(["required", {"type": "function", "function": {"name": "f"}}])
responses_choices = st.sampled_from(["required", {"type": "function", "name": "f"}])
messages_choices = st.sampled_from([{"type": "any"}, {"type": "tool", "name": "f"}])
# (path, body strategy): each puts hostile JSON into one free-form field
HOSTILE = {
    "chat response_format": (
        "/v1/chat/completions",
        st.builds(_chat_response_format, hostile, wraps),
    ),
    "chat tools": ("/v1/chat/completions", st.builds(_chat_tools, hostile, chat_choices)),
    "chat tool_choice": ("/v1/chat/completions", st.builds(_chat_tools, schema_like, hostile)),
    "completions response_format": (
        "/v1/completions",
        st.builds(_chat_response_format, hostile, wraps).map(
            lambda body: {"prompt": "hi", "response_format": body["response_format"]}
        ),
    ),
    "responses text.format": ("/v1/responses", st.builds(_responses_text, hostile, wraps)),
    "responses tools": ("/v1/responses", st.builds(_responses_tools, hostile, responses_choices)),
    "responses tool_choice": ("/v1/responses", st.builds(_responses_tools, schema_like, hostile)),
    "messages input_schema": (
        "/v1/messages",
        st.builds(_messages_tools, hostile, messages_choices),
    ),
    "messages tool_choice": ("/v1/messages", st.builds(_messages_tools, schema_like, hostile)),
    "chat sampling numbers": (
        "/v1/chat/completions",
        st.builds(
            lambda body, extra: {**body, **extra},
            _sampling(CHAT_SAMPLING, {**CHAT, "logprobs": True}),
            st.fixed_dictionaries({}, optional=TOKEN_LISTS),
        ),
    ),
    "messages sampling numbers": (
        "/v1/messages",
        _sampling(("temperature", "top_p", "top_k"), CHAT),
    ),
    "responses sampling numbers": (
        "/v1/responses",
        _sampling(("temperature", "top_p"), {"input": "hi"}),
    ),
}


def _encode(body: Any) -> bytes:
    """JSON as a careless client writes it: NaN and Infinity as bare words."""
    return json.dumps(body, allow_nan=True).encode()


@pytest.mark.parametrize("field", list(HOSTILE))
def test_hostile_json_in_free_form_fields(http: httpx.Client, before: str, field: str) -> None:
    path, bodies = HOSTILE[field]

    @FUZZ_SETTINGS
    @given(body=bodies, stream=st.booleans())
    def fuzz(body: dict[str, Any], stream: bool) -> None:
        body = {"model": MODEL, "max_tokens": MAX_TOKENS, "stream": stream, **body}
        if path == "/v1/responses":
            body["max_output_tokens"] = body.pop("max_tokens")
        content = _encode(body)
        if len(content) > MAX_REQUEST_BYTES:
            return
        headers = {"Content-Type": "application/json"}
        response = http.post(path, content=content, headers=headers)
        event(f"status {response.status_code}")
        check_response(
            path,
            response.status_code,
            response.headers.get("content-type", ""),
            response.text,
            content.decode(),
        )

    fuzz()


# --- hostile headers: the HTTP edge (Host, Origin, Content-Type) -------------------------------

PRINTABLE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)


def _host_names(port: int) -> st.SearchStrategy[str]:
    """Mostly names the server answers to, else odd or foreign ones."""
    good = ["localhost", f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "app.localhost"]
    odd = [
        "127.1", "evil.example", f"evil.example:{port}", "localhost.", "LOCALHOST", "[::1",
        "127.0.0.1.nip.io", "2130706433", "0x7f000001", "[::ffff:127.0.0.1]", "a:b:c",
        f"127.0.0.1:{port}0000", "127.0.0.1:-1", "", " ",
    ]  # fmt: skip
    return st.sampled_from(good) | st.sampled_from(good) | st.sampled_from(odd) | PRINTABLE


def _origins(port: int) -> st.SearchStrategy[str | None]:
    """Mostly none (a program), else the server's own, foreign or odd ones."""
    known = [
        f"http://127.0.0.1:{port}", f"http://localhost:{port}", f"https://127.0.0.1:{port}",
        "http://evil.example", "null", "file://", "http://[::1", "http://127.0.0.1:99999", "",
    ]  # fmt: skip
    return st.none() | st.none() | st.sampled_from(known) | PRINTABLE


CONTENT_TYPE_VALUES = [
    "application/json", "application/json; charset=utf-8", "APPLICATION/JSON",
    "application/vnd.api+json", "text/plain", "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x", "application/json;", ";", "",
]  # fmt: skip
CONTENT_TYPES = (
    st.sampled_from(CONTENT_TYPE_VALUES[:1])
    | st.none()
    | st.sampled_from(CONTENT_TYPE_VALUES)
    | PRINTABLE
)
FETCH_SITES = st.none() | st.sampled_from(["same-origin", "same-site", "cross-site", "none", "x"])
REQUESTS = [
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": MAX_TOKENS}),
    ("POST", "/v1/messages", {"model": MODEL, "max_tokens": MAX_TOKENS,
                              "messages": [{"role": "user", "content": "hi"}]}),
    ("POST", f"/admin/models/{MODEL}/load", None),
    ("GET", "/v1/models", None),
    ("GET", "/health", None),
    ("DELETE", "/v1/models", None),
    ("PUT", "/v1/messages", None),
    ("POST", "/nowhere", None),
]  # fmt: skip


# uvicorn's own answer to bytes that are not HTTP (h11 refuses them before the app sees them)
NOT_HTTP = b"Invalid HTTP request received."


def raw_request(port: int, method: str, path: str, headers: list[tuple[str, str]], body: bytes):
    """Send a request as written, byte for byte (an HTTP client refuses odd header values);
    return (status, content type, body)."""
    lines = [f"{method} {path} HTTP/1.1", *(f"{name}: {value}" for name, value in headers)]
    lines += [f"Content-Length: {len(body)}", "Connection: close"]
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(data)
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    head, _, content = response.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    found = dict(line.split(":", 1) for line in header_lines if ":" in line)
    content_type = {k.lower(): v.strip() for k, v in found.items()}.get("content-type", "")
    return int(status_line.split()[1]), content_type, content.decode("utf-8", "replace")


def test_hostile_headers(fuzz_server: RunningServer, before: str) -> None:
    port = int(fuzz_server.url.rsplit(":", 1)[1])

    @FUZZ_SETTINGS
    @given(
        request=st.sampled_from(REQUESTS),
        host=_host_names(port) | st.none(),
        origin=_origins(port),
        content_type=CONTENT_TYPES,
        fetch_site=FETCH_SITES,
    )
    def fuzz(
        request: tuple[str, str, Any],
        host: str | None,
        origin: str | None,
        content_type: str | None,
        fetch_site: str | None,
    ) -> None:
        method, path, body = request
        named = [("Host", host), ("Origin", origin), ("Content-Type", content_type)]
        named.append(("Sec-Fetch-Site", fetch_site))
        headers = [("Authorization", AUTH["Authorization"])]
        headers += [(name, value) for name, value in named if value is not None]
        content = json.dumps(body).encode() if body is not None else b""
        status, kind, text = raw_request(port, method, path, headers, content)
        event(f"status {status}")
        if status == 400 and text.encode() == NOT_HTTP:
            return  # not HTTP: never reached the app
        check_response(path, status, kind, text, f"{method} {path} {headers} {content!r}")

    fuzz()


# --- afterwards --------------------------------------------------------------------------------


def test_the_server_answers_the_same_after_the_fuzzing(http: httpx.Client, before: str) -> None:
    """Last in the file: the fuzzing may have unloaded the model; it loads again and answers
    the fixed greedy request as before."""
    loaded = http.post(f"/admin/models/{MODEL}/load")
    assert loaded.status_code == 200, loaded.text
    assert http.get("/health").status_code == 200
    assert greedy_text(http) == before
    # nothing a client could not see either: no 5xx counted, no request failed in the engine
    failures = re.compile(
        r'^mlxserve_(http_errors_total\{.*status="5\d\d"|request_errors_total\{.*'
        r'kind="generation_failed").* ([0-9.e+]+)$'
    )
    metrics = http.get("/metrics").text.splitlines()
    assert not [line for line in metrics if (m := failures.match(line)) and float(m[2]) > 0]
