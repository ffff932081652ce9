"""The OpenAI-compatible API, end to end: a real uvicorn server, the official openai client."""

from __future__ import annotations

import concurrent.futures
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import mlx.core as mx
import openai
import pytest

from ..support.engine import mlx_lm_greedy
from ..support.server import (
    RunningServer,
    every_family_config,
    get,
    post,
    running_server,
    wait_until,
    write_config,
)

HELLO = [{"role": "user", "content": "Hello there! How are you today?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoints) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("server")
    config = write_config(
        tmp,
        every_family_config(
            tmp,
            tiny_checkpoints,
            "llama",
            aliases='"tiny"',
            extra="[performance]\nmax_batch_size = 8\nprefill_step_size = 32\n"
            "[kv_cache]\nmax_sequence_length = 256\n",
        ),
    )
    with running_server(config) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def chat(client: openai.OpenAI, model: str = "llama", **kwargs: object) -> object:
    kwargs.setdefault("messages", HELLO)
    kwargs.setdefault("temperature", 0)
    kwargs.setdefault("max_tokens", 24)
    return client.chat.completions.create(model=model, **kwargs)


def stream_text(client: openai.OpenAI, **kwargs: object) -> tuple[str, list[object]]:
    chunks = list(chat(client, stream=True, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


# ---- generation ------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen", "mistral", "deepseek"])
def test_greedy_output_equals_mlx_lm_generate(
    client: openai.OpenAI, tiny_checkpoints: dict[str, Path], family: str
) -> None:
    prompt = [5, 9, 77, 120, 33, 8, 250, 19]
    response = client.completions.create(model=family, prompt=prompt, max_tokens=20, temperature=0)
    assert response.choices[0].text == mlx_lm_greedy(tiny_checkpoints[family], prompt, 20)


def test_stream_and_non_stream_give_the_same_greedy_text(client: openai.OpenAI) -> None:
    whole = chat(client)
    text, chunks = stream_text(client)
    assert text == whole.choices[0].message.content and text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_max_tokens_and_usage(client: openai.OpenAI, server: RunningServer) -> None:
    messages = [{"role": "user", "content": "A question nobody else in these tests asks?"}]
    response = chat(client, messages=messages, max_tokens=7, extra_body={"ignore_eos": True})
    assert response.choices[0].finish_reason == "length"
    model = server.engine.workers["llama"].model
    prompt = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert response.usage.prompt_tokens == len(prompt)
    assert response.usage.completion_tokens == 7
    assert response.usage.total_tokens == len(prompt) + 7
    assert response.usage.prompt_tokens_details.cached_tokens == 0
    timings = response.model_extra["timings"]
    assert timings["ttft_s"] > 0 and timings["tokens_per_s"] > 0


def test_stream_usage_chunk(client: openai.OpenAI) -> None:
    _, chunks = stream_text(
        client,
        max_tokens=5,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert all(c.usage is None for c in chunks[:-1])


def test_stop_strings_are_never_returned(client: openai.OpenAI) -> None:
    full = chat(client, max_tokens=40, extra_body={"ignore_eos": True}).choices[0].message.content
    assert len(full) > 12
    stop = full[6:9]
    expected = full[: full.index(stop)]
    response = chat(client, max_tokens=40, stop=[stop], extra_body={"ignore_eos": True})
    assert response.choices[0].message.content == expected
    assert response.choices[0].finish_reason == "stop"
    text, chunks = stream_text(client, max_tokens=40, stop=stop, extra_body={"ignore_eos": True})
    assert text == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_stop_on_eos(client: openai.OpenAI, server: RunningServer) -> None:
    """Forcing the eos token with logit_bias ends the answer at once, with no text."""
    tokenizer = server.engine.workers["llama"].model.tokenizer
    eos = sorted(tokenizer.eos_token_ids)[0]
    response = chat(client, logit_bias={str(eos): 100})
    assert response.choices[0].finish_reason == "stop"
    assert response.choices[0].message.content == ""
    assert response.usage.completion_tokens == 1


def test_sixteen_requests_eight_at_a_time_match_one_by_one(client: openai.OpenAI) -> None:
    prompts = [[{"role": "user", "content": f"Question {i}: " + "why? " * i}] for i in range(16)]

    def ask(messages: list[dict[str, str]]) -> str:
        response = chat(client, messages=messages, max_tokens=16, extra_body={"ignore_eos": True})
        assert response.usage.completion_tokens == 16
        return response.choices[0].message.content

    alone = [ask(p) for p in prompts[:3]]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, prompts))
    assert together[:3] == alone
    assert len(set(together)) > 1


def test_seeded_sampling_is_reproducible(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        return (
            chat(client, temperature=1.0, seed=seed, max_tokens=16, extra_body={"ignore_eos": True})
            .choices[0]
            .message.content
        )

    assert sample(7) == sample(7)
    assert len({sample(s) for s in range(5)}) > 1


def test_logprobs(client: openai.OpenAI) -> None:
    response = chat(
        client, max_tokens=4, logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True}
    )
    content = response.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-4


def test_completions_with_text_and_stream(client: openai.OpenAI) -> None:
    whole = client.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=10, temperature=0
    )
    assert whole.model == "llama"
    chunks = list(
        client.completions.create(
            model="tiny", prompt="Once upon a time", max_tokens=10, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text


def test_models_list(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {"llama", "qwen", "mistral", "deepseek"}
    assert models["llama"].model_extra["aliases"] == ["tiny"]
    assert models["llama"].model_extra["loaded"] is True
    assert client.models.retrieve("tiny").id == "llama"


def test_root_and_health(server: RunningServer) -> None:
    root = get(server, "/").json()
    assert root["name"] == "mlxserve" and "llama" in root["models"]
    health = get(server, "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"


# ---- errors ----------------------------------------------------------------------------


def error_of(response: httpx.Response) -> dict[str, object]:
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"])
    return body["error"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": HELLO, "temperature": -1}, "temperature"),
        ({"messages": HELLO, "top_p": 0}, "top_p"),
        ({"messages": HELLO, "max_tokens": 0}, "max_tokens"),
        ({"messages": HELLO, "n": 2}, "n"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"messages": HELLO, "logit_bias": {"999999": 5}}, "logit_bias"),
        ({"messages": HELLO, "max_tokens": "many"}, "max_tokens"),
    ],
)
def test_invalid_parameters_are_400(server: RunningServer, body: dict, param: str) -> None:
    response = post(server, "/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert error_of(response)["param"] == param


def test_malformed_bodies_are_400(server: RunningServer) -> None:
    for content in (b"{not json", b"[]", b""):
        response = post(
            server,
            "/v1/chat/completions",
            content=content,
            headers={"content-type": "application/json"},
        )
        assert response.status_code == 400, (content, response.text)
        error_of(response)


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        chat(client, model="gpt-4")
    assert info.value.body["code"] == "model_not_found"


def test_request_can_not_name_a_path(client: openai.OpenAI, tiny_checkpoints) -> None:
    with pytest.raises(openai.NotFoundError):
        chat(client, model=str(tiny_checkpoints["llama"]))


def test_prompt_longer_than_the_context_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="llama", prompt=[5] * 300, max_tokens=4)
    assert "256 tokens" in info.value.message and "300 tokens" in info.value.message
    with pytest.raises(openai.BadRequestError, match="max_tokens asks for 100"):
        client.completions.create(model="llama", prompt=[5] * 200, max_tokens=100)


def test_unknown_route_is_openai_shaped(server: RunningServer) -> None:
    response = get(server, "/v1/nothing")
    assert response.status_code == 404
    error_of(response)


def test_client_disconnect_aborts_and_frees_the_sequence(server: RunningServer) -> None:
    body = {
        "model": "llama",
        "messages": HELLO,
        "max_tokens": 200,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    worker = server.engine.workers["llama"]
    assert wait_until(lambda: worker.scheduler.num_active == 0 and not worker.runner.rows)
    assert chat(openai.OpenAI(base_url=server.url + "/v1", api_key="x")).choices


# ---- servers with their own config -----------------------------------------------------


def small_config(tmp_path: Path, checkpoint: Path, extra: str = "") -> object:
    return write_config(
        tmp_path,
        f'[registry]\ndefault_model = "m"\ncache_dir = "{tmp_path / "cache"}"\n'
        f'[models.m]\nsource = "{checkpoint}"\n{extra}',
    )


def test_full_queue_is_429_with_retry_after(tmp_path: Path, tiny_checkpoints) -> None:
    config = small_config(
        tmp_path, tiny_checkpoints["llama"], "[performance]\nmax_batch_size = 1\nqueue_size = 1\n"
    )
    body = {"model": "m", "prompt": "hi", "max_tokens": 1000, "ignore_eos": True}
    with running_server(config) as srv:
        scheduler = srv.engine.workers["m"].scheduler
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            running = pool.submit(post, srv, "/v1/completions", json=body)
            assert wait_until(lambda: scheduler.num_active == 1)
            waiting = pool.submit(post, srv, "/v1/completions", json=body)
            assert wait_until(lambda: srv.engine.queue_depth() == 1)
            rejected = post(srv, "/v1/completions", json=body)
            assert rejected.status_code == 429
            assert rejected.headers["retry-after"] == "1"
            assert error_of(rejected)["code"] == "queue_full"
            assert running.result().status_code == 200
            assert waiting.result().status_code == 200


def test_timeout_is_504_and_frees_the_sequence(tmp_path: Path, tiny_checkpoints) -> None:
    config = small_config(
        tmp_path,
        tiny_checkpoints["llama"],
        "[server]\nrequest_timeout_s = 0.2\n[performance]\nprefill_step_size = 2\n",
    )
    body = {"model": "m", "prompt": [5] * 400, "max_tokens": 1000, "ignore_eos": True}
    with running_server(config) as srv:
        response = post(srv, "/v1/completions", json=body)
        assert response.status_code == 504
        assert error_of(response)["code"] == "timeout"
        worker = srv.engine.workers["m"]
        assert wait_until(lambda: worker.scheduler.num_active == 0)


def test_api_keys(tmp_path: Path, tiny_checkpoints) -> None:
    config = small_config(
        tmp_path, tiny_checkpoints["llama"], '[server]\napi_keys = ["sk-right"]\n'
    )
    with running_server(config) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="sk-wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
        missing = get(srv, "/v1/models")
        assert missing.status_code == 401 and error_of(missing)["code"] == "invalid_api_key"
        assert post(srv, "/admin/models/m/load").status_code == 401
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="sk-right")
        assert [m.id for m in client.models.list()] == ["m"]
        assert get(srv, "/health").status_code == 200


def test_cors_only_for_configured_origins(tmp_path: Path, tiny_checkpoints) -> None:
    config = small_config(
        tmp_path, tiny_checkpoints["llama"], '[server]\ncors_origins = ["http://ok.test"]\n'
    )
    headers = {"Access-Control-Request-Method": "POST"}
    with running_server(config) as srv:
        ok = httpx.options(srv.url + "/v1/models", headers={**headers, "Origin": "http://ok.test"})
        bad = httpx.options(srv.url + "/v1/models", headers={**headers, "Origin": "http://evil"})
        assert ok.headers.get("access-control-allow-origin") == "http://ok.test"
        assert "access-control-allow-origin" not in bad.headers


def test_engine_failure_is_an_error_response_and_serving_goes_on(
    tmp_path: Path, tiny_checkpoints
) -> None:
    from mlxserve.plugins import hookimpl
    from mlxserve.registry.plugins import load_plugins

    class FailOnToken17:  # in a prompt; a token the exactness check's probe does not use
        @hookimpl
        def mlxserve_sharding_rule(self, family, model):  # noqa: ANN001, ANN201
            layout = family.layout(model)
            run = layout.run

            def cursed_run(tokens: mx.array, cache: Any) -> mx.array:
                if tokens.shape[-1] > 1 and (tokens == 17).any().item():
                    raise RuntimeError("token 17 is cursed")
                return run(tokens, cache)

            layout.run = cursed_run
            return layout

    plugins = load_plugins(extra=[("fail", FailOnToken17())])
    config = small_config(tmp_path, tiny_checkpoints["llama"])
    with running_server(config, plugins) as srv:
        failed = post(srv, "/v1/completions", json={"model": "m", "prompt": [4, 17, 5]})
        assert failed.status_code == 500
        assert "token 17 is cursed" in error_of(failed)["message"]
        ok = post(srv, "/v1/completions", json={"model": "m", "prompt": [4, 5], "max_tokens": 3})
        assert ok.status_code == 200, ok.text
        assert get(srv, "/health").status_code == 200


def test_health_is_503_when_the_engine_is_gone(tmp_path: Path, tiny_checkpoints) -> None:
    config = small_config(tmp_path, tiny_checkpoints["llama"])
    with running_server(config) as srv:
        srv.engine.stop()
        health = get(srv, "/health")
        assert health.status_code == 503 and health.json()["status"] == "unavailable"
        response = post(srv, "/v1/completions", json={"model": "m", "prompt": "hi"})
        assert response.status_code == 503


def test_switching_models_keeps_running_requests(tmp_path: Path, tiny_checkpoints) -> None:
    config = write_config(
        tmp_path,
        f'[registry]\ndefault_model = "a"\ncache_dir = "{tmp_path / "cache"}"\n'
        f"max_loaded_models = 1\n"
        f'[models.a]\nsource = "{tiny_checkpoints["llama"]}"\n'
        f'[models.b]\nsource = "{tiny_checkpoints["qwen"]}"\n',
    )
    body = {"prompt": [5, 6, 7], "max_tokens": 150, "temperature": 0, "ignore_eos": True}
    with running_server(config) as srv:
        reference = post(srv, "/v1/completions", json={**body, "model": "a"}).json()
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            long_a = pool.submit(post, srv, "/v1/completions", json={**body, "model": "a"})
            assert wait_until(
                lambda: (
                    srv.engine.workers.get("a") is not None
                    and srv.engine.workers["a"].scheduler.num_active > 0
                )
            )
            b = pool.submit(
                post, srv, "/v1/completions", json={**body, "model": "b", "max_tokens": 5}
            )
            a_result, b_result = long_a.result(), b.result()
        assert a_result.status_code == 200 and b_result.status_code == 200
        assert a_result.json()["choices"][0]["text"] == reference["choices"][0]["text"]
        assert a_result.json()["usage"]["completion_tokens"] == 150
        assert srv.engine.loaded_models() == ["b"]
        again = post(srv, "/v1/completions", json={**body, "model": "a", "max_tokens": 150})
        assert again.json()["choices"][0]["text"] == reference["choices"][0]["text"]


def test_admin_load_and_unload(tmp_path: Path, tiny_checkpoints) -> None:
    config = write_config(
        tmp_path,
        f'[registry]\ndefault_model = "a"\ncache_dir = "{tmp_path / "cache"}"\n'
        f"max_loaded_models = 2\n"
        f'[models.a]\nsource = "{tiny_checkpoints["llama"]}"\n'
        f'[models.b]\nsource = "{tiny_checkpoints["qwen"]}"\naliases = ["bee"]\n'
        "[performance]\nprefill_step_size = 2\n",
    )
    with running_server(config) as srv:
        loaded = post(srv, "/admin/models/bee/load")
        assert loaded.status_code == 200 and loaded.json()["loaded"] is True
        names = [m["id"] for m in get(srv, "/admin/models").json()["data"]]
        assert names == ["a", "b"]
        unloaded = post(srv, "/admin/models/a/unload")
        assert unloaded.json()["loaded"] is False
        assert post(srv, "/admin/models/nope/load").status_code == 404
        body = {"model": "b", "prompt": [5] * 400, "max_tokens": 10}
        scheduler = srv.engine.workers["b"].scheduler
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            slow = pool.submit(post, srv, "/v1/completions", json=body)
            assert wait_until(lambda: scheduler.num_active == 1)
            busy = post(srv, "/admin/models/b/unload")
            assert busy.status_code == 409 and error_of(busy)["code"] == "model_busy"
            assert slow.result().status_code == 200
        assert json.loads(get(srv, "/health").text)["status"] == "ok"


def test_every_refusal_logs_one_line_saying_why_at_most_a_few_a_second(
    tmp_path: Path, tiny_checkpoints, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="mlxserve.server.errors")
    config = small_config(tmp_path, tiny_checkpoints["llama"])
    bad = {"model": "m", "prompt": [4, 5], "temperature": -1}
    with running_server(config) as srv:
        mine = post(srv, "/v1/completions", json=bad, headers={"x-request-id": "agent-7"})
        assert mine.status_code == 400 and mine.headers["x-request-id"] == "agent-7"
        assert post(srv, "/v1/completions", json=bad).headers["x-request-id"].startswith("req_")
        started = time.monotonic()
        burst = [post(srv, "/v1/completions", json=bad).status_code for _ in range(40)]
        took = time.monotonic() - started
        time.sleep(1.0)
        post(srv, "/v1/completions", json=bad)
    assert set(burst) == {400}
    lines = [r.getMessage() for r in caplog.records if r.name == "mlxserve.server.errors"]
    assert lines[0].startswith(
        "agent-7 POST /v1/completions: 400 invalid_request_error: temperature"
    )
    assert len(lines) <= 2 + 5 + 5 * took + 1  # a burst of 5, then 5 a second
    left_out = sum(int(n) for n in re.findall(r"\((\d+) more like it not logged\)", "".join(lines)))
    assert len(lines) + left_out == 43  # every refusal is logged or counted
