"""The HTTP edge cannot be used to hurt other requests: body limits, off-loop tokenizing,
disconnects, auth, hostile strings and numbers, family defaults; a real server throughout."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from tokenizers import Tokenizer

from mlxserve.plugins import ModelFamily, hookimpl
from mlxserve.plugins.families.llama import Llama
from mlxserve.registry.plugins import load_plugins

from ..support.server import RunningServer, running_server, wait_until, write_config

KEY = "sk-hardening-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMIT = 2 * 2**20
EXTRA_STOP = "<|start_header_id|>"  # in the tiny llama's vocabulary, not one of its eos tokens


class GreedyLlama(Llama):
    name = "llama-greedy"
    model_types = ("llama-greedy",)
    sampling_defaults = {"temperature": 0.0}


class StopLlama(Llama):
    name = "llama-stop"
    model_types = ("llama-stop",)
    stop_tokens = (*Llama.stop_tokens, EXTRA_STOP)


class TestFamilies:
    @hookimpl
    def mlxserve_families(self) -> list[ModelFamily]:
        return [GreedyLlama(), StopLlama()]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoints) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("hardening")
    llama = tiny_checkpoints["llama"]
    config = write_config(
        tmp,
        f"""
[server]
api_keys = ["{KEY}"]
max_request_bytes = {LIMIT}
[registry]
default_model = "llama"
cache_dir = "{tmp / "cache"}"
max_loaded_models = 3
[models.llama]
source = "{llama}"
[models.greedy]
source = "{llama}"
family = "llama-greedy"
[models.stopper]
source = "{llama}"
family = "llama-stop"
[kv_cache]
max_sequence_length = 4096
""",
    )
    plugins = load_plugins(extra=[("hardening-test-families", TestFamilies())])
    with running_server(config, plugins) as running:
        yield running


@pytest.fixture(scope="module")
def http(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def post_raw(http: httpx.Client, path: str, body: str) -> httpx.Response:
    return http.post(path, content=body.encode(), headers={"content-type": "application/json"})


def error_of(response: httpx.Response) -> dict[str, Any]:
    return response.json()["error"]


def metric(http: httpx.Client, name: str, **labels: str) -> float:
    total = 0.0
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


# ---- a big body cannot freeze the server --------------------------------------------------


def health_latencies_while(http: httpx.Client, send: Any) -> tuple[list[float], httpx.Response]:
    """Poll /health while ``send()`` runs in a thread; the latencies and its response."""
    done: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: done.append(send()))
    thread.start()
    latencies = []
    with httpx.Client(base_url=http.base_url, timeout=30) as probe:
        while not latencies or thread.is_alive():
            started = time.monotonic()
            assert probe.get("/health").status_code == 200
            latencies.append(time.monotonic() - started)
            time.sleep(0.02)
    thread.join()
    return latencies, done[0]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": "hello world " * ((LIMIT - 200) // 12)}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi " * 690000}]}),
        ("/v1/completions", {"prompt": list(range(7, 7 + 270_000))}),
    ],
    ids=["text", "chat", "token-ids"],
)
def test_health_answers_while_a_body_just_under_the_limit_is_handled(
    http: httpx.Client, path: str, body: dict[str, Any]
) -> None:
    raw = json.dumps({**body, "max_tokens": 4})
    assert LIMIT - 100_000 < len(raw) <= LIMIT
    latencies, response = health_latencies_while(http, lambda: post_raw(http, path, raw))
    assert response.status_code == 400
    assert error_of(response)["code"] == "context_length_exceeded"
    assert max(latencies) < 0.5, latencies


def test_a_text_that_fits_is_tokenized_and_served(client: openai.OpenAI) -> None:
    response = client.completions.create(
        model="llama", prompt="hello world " * 300, max_tokens=3, temperature=0
    )
    assert response.usage.prompt_tokens > 300
    assert response.usage.completion_tokens == 3


def test_a_declared_body_over_the_limit_gets_413(http: httpx.Client) -> None:
    before = metric(http, "mlxserve_http_errors_total", status="413")
    response = post_raw(http, "/v1/completions", json.dumps({"prompt": "x" * LIMIT}))
    assert response.status_code == 413
    error = error_of(response)
    assert error["code"] == "request_too_large" and error["type"] == "invalid_request_error"
    assert str(LIMIT) in error["message"]
    assert metric(http, "mlxserve_http_errors_total", status="413") == before + 1


def test_a_chunked_body_over_the_limit_gets_413(http: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(LIMIT // 65536 + 2):
            yield b"x" * 65536
        yield b'"}'

    response = http.post(
        "/v1/completions", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.request.headers.get("transfer-encoding") == "chunked"
    assert response.status_code == 413
    assert error_of(response)["code"] == "request_too_large"
    assert http.get("/health").status_code == 200


# ---- a client that goes away stops its request --------------------------------------------


def test_a_non_streaming_request_stops_when_its_client_goes_away(
    server: RunningServer, http: httpx.Client
) -> None:
    generated = metric(http, "mlxserve_generation_tokens_total", model="llama")
    gone = metric(http, "mlxserve_request_errors_total", kind="client_disconnected")
    body = {"prompt": [5, 9, 77], "max_tokens": 3000, "ignore_eos": True, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, headers=AUTH, timeout=0.3)
    scheduler = server.engine.workers["llama"].scheduler
    assert wait_until(lambda: scheduler.num_active == 0, timeout=1.0)
    spent = metric(http, "mlxserve_generation_tokens_total", model="llama") - generated
    assert spent < 1000
    assert metric(http, "mlxserve_request_errors_total", kind="client_disconnected") == gone + 1


# ---- API keys ------------------------------------------------------------------------------


def test_non_ascii_authorization_is_401_not_500(server: RunningServer) -> None:
    for value in (b"Bearer \xff\xfe\xe9", "Bearer sk-é".encode(), b"\xff"):
        response = httpx.get(server.url + "/v1/models", headers={"Authorization": value})
        assert response.status_code == 401
        assert error_of(response)["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/v1/models", headers=AUTH).status_code == 200


@pytest.mark.parametrize("path", ["/", "/docs", "/redoc", "/openapi.json"])
def test_root_and_docs_need_the_key(server: RunningServer, path: str) -> None:
    response = httpx.get(server.url + path)
    assert response.status_code == 401
    assert error_of(response)["code"] == "invalid_api_key"
    assert httpx.get(server.url + path, headers=AUTH).status_code == 200


def test_the_schema_still_describes_the_api(http: httpx.Client) -> None:
    paths = http.get("/openapi.json").json()["paths"]
    assert "/v1/chat/completions" in paths and "/docs" not in paths


@pytest.mark.parametrize("path", ["/health", "/metrics"])
def test_health_and_metrics_need_no_key(server: RunningServer, path: str) -> None:
    assert httpx.get(server.url + path).status_code == 200


# ---- hostile strings and numbers ----------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", '{"prompt": "a\\ud800b"}', "prompt"),
        ("/v1/completions", '{"prompt": "x", "stop": ["\\udfff"]}', "stop"),
        ("/v1/completions", '{"prompt": "x", "model": "\\ud800"}', "model"),
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": "\\udc00"}]}',
            "messages.0.content",
        ),
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
            "messages.0.content",
        ),
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": [{"type": "\\ud800"}]}]}',
            "messages.0.content",
        ),
    ],
)
def test_lone_surrogates_are_400_naming_the_field(
    http: httpx.Client, path: str, body: str, param: str
) -> None:
    response = post_raw(http, path, body)
    assert response.status_code == 400, response.text
    assert error_of(response)["param"].startswith(param)


LAX = [
    ({"logprobs": False, "top_logprobs": 2}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"max_tokens": True}, "max_tokens"),
    ({"max_tokens": "5"}, "max_tokens"),
    ({"max_tokens": 2**40}, "max_tokens"),
    ({"max_completion_tokens": False}, "max_completion_tokens"),
    ({"temperature": True}, "temperature"),
    ({"top_p": "0.5"}, "top_p"),
    ({"top_k": True}, "top_k"),
    ({"top_k": 2**63}, "top_k"),
    ({"seed": 2**64}, "seed"),
    ({"seed": True}, "seed"),
    ({"n": 2**70}, "n"),
    ({"n": True}, "n"),
    ({"stop_token_ids": list(range(65))}, "stop_token_ids"),
    ({"stop_token_ids": [10**6]}, "stop_token_ids"),
    ({"stop_token_ids": [True]}, "stop_token_ids"),
    ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
    ({"logit_bias": {"5": True}}, "logit_bias"),
    ({"logit_bias": {str(10**6): 1}}, "logit_bias"),
    ({"stop": ["x" * 257]}, "stop"),
    ({"stop": ["a"] * 17}, "stop"),
]


@pytest.mark.parametrize(("fields", "param"), LAX, ids=[str(f)[:40] for f, _ in LAX])
def test_lax_values_are_400_naming_the_field(
    http: httpx.Client, fields: dict[str, Any], param: str
) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert error_of(response)["param"].split(".")[0] == param


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_numbers_are_400(http: httpx.Client, value: str) -> None:
    response = post_raw(http, "/v1/completions", f'{{"prompt": "x", "temperature": {value}}}')
    assert response.status_code == 400
    assert error_of(response)["param"] == "temperature"


def test_completion_logprobs_must_be_an_integer(http: httpx.Client) -> None:
    response = http.post("/v1/completions", json={"prompt": "x", "logprobs": True})
    assert response.status_code == 400
    assert error_of(response)["param"] == "logprobs"


@pytest.mark.parametrize(
    "fields",
    [
        {"top_k": 2**31 - 1},
        {"seed": -(2**63)},
        {"seed": 2**63 - 1},
        {"temperature": 1, "top_p": 1},
        {"logprobs": True, "top_logprobs": 0},
        {"stop_token_ids": list(range(64))},
    ],
    ids=str,
)
def test_values_at_the_edges_are_served(http: httpx.Client, fields: dict[str, Any]) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text


def test_rejections_are_counted_by_status_and_code(
    server: RunningServer, http: httpx.Client
) -> None:
    unauthorized = metric(http, "mlxserve_http_errors_total", status="401", code="invalid_api_key")
    invalid = metric(http, "mlxserve_http_errors_total", status="400")
    httpx.get(server.url + "/v1/models")
    http.post("/v1/completions", json={"prompt": "x", "max_tokens": True})
    http.post("/v1/completions", json={"prompt": "x", "max_tokens": 0})
    assert metric(http, "mlxserve_http_errors_total", status="401", code="invalid_api_key") == (
        unauthorized + 1
    )
    assert metric(http, "mlxserve_http_errors_total", status="400") == invalid + 2


# ---- the family contract -------------------------------------------------------------------


def test_family_sampling_defaults_apply_and_a_request_value_wins(client: openai.OpenAI) -> None:
    prompt, n = [5, 9, 77, 120, 33], 16
    greedy = client.completions.create(model="llama", prompt=prompt, max_tokens=n, temperature=0)
    by_family = client.completions.create(model="greedy", prompt=prompt, max_tokens=n)
    assert by_family.choices[0].text == greedy.choices[0].text

    hot = {"prompt": prompt, "max_tokens": n, "temperature": 1.5, "seed": 7}
    sampled = client.completions.create(model="llama", **hot)
    overridden = client.completions.create(model="greedy", **hot)
    assert overridden.choices[0].text == sampled.choices[0].text != greedy.choices[0].text


def test_a_family_stop_token_ends_generation(
    client: openai.OpenAI, tiny_checkpoints: dict[str, Path]
) -> None:
    tokenizer = Tokenizer.from_file(str(tiny_checkpoints["llama"] / "tokenizer.json"))
    stop = tokenizer.token_to_id(EXTRA_STOP)
    request = {
        "prompt": [5, 9, 77],
        "max_tokens": 8,
        "temperature": 0,
        "logit_bias": {str(stop): 100},
    }
    plain = client.completions.create(model="llama", **request)
    assert plain.choices[0].finish_reason == "length"
    assert plain.usage.completion_tokens == 8
    stopped = client.completions.create(model="stopper", **request)
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens <= 1


def test_odd_inputs_are_4xx_naming_the_problem(http: httpx.Client) -> None:
    """Found in review: each of these was a 500 or a misleading error."""
    empty = http.post("/v1/completions", json={"prompt": "", "max_tokens": 2})
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "prompt"
    for items in (["hi"], [5], [None]):
        response = http.post("/v1/responses", json={"input": items})
        assert response.status_code == 400, (items, response.text)
    for name in ("a%00.js", "x" * 5000 + ".js", "..%2Fapp.py"):
        page_file = http.get(f"/ui/static/{name}")
        assert page_file.status_code == 404, (name, page_file.text)
        assert "/work" not in page_file.text and "static" not in page_file.text
