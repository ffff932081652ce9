"""Echo and the prompt's log probabilities on /v1/completions, by the official openai client,
against mlx-lm's own model call on the same checkpoint (what lm-eval's loglikelihood needs)."""

from __future__ import annotations

import concurrent.futures
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from mlxserve.core.engine import worker

from ..support.engine import mlx_lm_logprobs
from ..support.server import RunningServer, post, running_server, write_config

TOLERANCE = 1e-4
# Longer than a prefill chunk (32 tokens): scored over several chunks.
LONG = [(7 * i + 3) % 250 + 2 for i in range(75)]
SHORT = [[5, 9, 77, 120, 33, 8, 250, 19], [42] * 12, list(range(3, 30)), [11, 200, 7]]


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoints, today_checkpoints) -> dict[str, Path]:
    return {"llama": tiny_checkpoints["llama"], "hybrid": today_checkpoints["qwen3_next"]}


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, checkpoints: dict[str, Path]
) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("echo")
    models = "".join(f'[models.{name}]\nsource = "{path}"\n' for name, path in checkpoints.items())
    config = write_config(
        tmp,
        f'[registry]\ndefault_model = "llama"\ncache_dir = "{tmp / "cache"}"\n'
        f"max_loaded_models = 2\n{models}"
        "[performance]\nmax_batch_size = 8\nprefill_step_size = 32\n"
        "[kv_cache]\nmax_sequence_length = 256\n",
    )
    with running_server(config) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def score(client: openai.OpenAI, prompt: list[int] | str, model: str = "llama", **kwargs: object):  # noqa: ANN201
    kwargs = {"echo": True, "logprobs": 2, "max_tokens": 0, "temperature": 0, **kwargs}
    return client.completions.create(model=model, prompt=prompt, **kwargs)


def tokenizer_of(server: RunningServer, model: str = "llama"):  # noqa: ANN201
    return server.engine.workers[model].model.tokenizer


def assert_scored_like_mlx_lm(  # noqa: ANN201
    logprobs,
    prompt: list[int],
    checkpoint: Path,
    tokenizer,
    top_n: int = 2,  # noqa: ANN001
):
    """The first ``len(prompt)`` entries of ``logprobs`` score ``prompt`` as mlx-lm does: each
    token's logprob, its position's ``top_n`` (and itself), its text and where that starts."""
    reference = mlx_lm_logprobs(checkpoint, prompt)
    n = len(prompt)
    assert logprobs.tokens[:n] == [tokenizer.decode([t]) for t in prompt]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    for i in range(1, n):
        row = reference[i - 1]
        assert logprobs.token_logprobs[i] == pytest.approx(row[prompt[i]], abs=TOLERANCE)
        top = np.argsort(-row)[:top_n]
        want = {tokenizer.decode([int(t)]): float(row[t]) for t in top}
        want.setdefault(tokenizer.decode([prompt[i]]), float(row[prompt[i]]))
        assert logprobs.top_logprobs[i] == pytest.approx(want, abs=TOLERANCE)
    offsets = [sum(len(t) for t in logprobs.tokens[:i]) for i in range(n)]
    assert logprobs.text_offset[:n] == offsets


@pytest.mark.parametrize("prompt", [LONG, SHORT[0]], ids=["chunked", "short"])
def test_echoed_prompt_logprobs_equal_mlx_lm(
    client: openai.OpenAI, server: RunningServer, checkpoints: dict[str, Path], prompt: list[int]
) -> None:
    response = score(client, prompt)
    choice = response.choices[0]
    assert choice.finish_reason == "length"
    assert choice.text == tokenizer_of(server).decode(prompt)
    assert response.usage.prompt_tokens == len(prompt) and response.usage.completion_tokens == 0
    assert_scored_like_mlx_lm(choice.logprobs, prompt, checkpoints["llama"], tokenizer_of(server))


def test_a_hybrid_recurrent_model_scores_its_prompt(
    client: openai.OpenAI, server: RunningServer, checkpoints: dict[str, Path]
) -> None:
    response = score(client, LONG, model="hybrid")
    tokenizer = tokenizer_of(server, "hybrid")
    assert_scored_like_mlx_lm(response.choices[0].logprobs, LONG, checkpoints["hybrid"], tokenizer)
    again = score(client, LONG, model="hybrid")
    assert again.choices[0].logprobs.token_logprobs == response.choices[0].logprobs.token_logprobs


def test_echo_of_a_text_prompt_then_its_continuation(
    client: openai.OpenAI, server: RunningServer, checkpoints: dict[str, Path]
) -> None:
    prompt = "Once upon a time, in a land far away"
    ids = tokenizer_of(server).encode(prompt)
    plain = client.completions.create(
        model="llama", prompt=prompt, max_tokens=5, temperature=0, logprobs=3
    )
    echoed = score(client, prompt, max_tokens=5, logprobs=3, extra_body={"ignore_eos": True})
    choice, generated = echoed.choices[0], plain.choices[0].text
    assert choice.text == prompt + generated
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(ids) + echoed.usage.completion_tokens
    assert logprobs.tokens[len(ids) :] == plain.choices[0].logprobs.tokens
    assert logprobs.token_logprobs[len(ids) :] == plain.choices[0].logprobs.token_logprobs
    ends = [o + len(t) for o, t in zip(logprobs.text_offset, logprobs.tokens, strict=True)]
    assert logprobs.text_offset[1:] == ends[:-1]
    assert logprobs.text_offset[len(ids)] == len(prompt)
    assert_scored_like_mlx_lm(logprobs, ids, checkpoints["llama"], tokenizer_of(server), top_n=3)


def test_echo_without_logprobs_is_the_text_alone(client: openai.OpenAI) -> None:
    prompt = "The quick brown fox"
    alone = client.completions.create(
        model="llama", prompt=prompt, echo=True, max_tokens=0, temperature=0
    )
    assert alone.choices[0].text == prompt and alone.choices[0].logprobs is None
    assert alone.choices[0].finish_reason == "length"
    plain = client.completions.create(model="llama", prompt=prompt, max_tokens=4, temperature=0)
    echoed = client.completions.create(
        model="llama", prompt=prompt, echo=True, max_tokens=4, temperature=0
    )
    assert echoed.choices[0].text == prompt + plain.choices[0].text


def test_streamed_echo_arrives_first_and_equals_the_whole(client: openai.OpenAI) -> None:
    whole = score(client, LONG, max_tokens=4, extra_body={"ignore_eos": True}).choices[0]
    chunks = list(score(client, LONG, max_tokens=4, stream=True, extra_body={"ignore_eos": True}))
    first = chunks[0].choices[0]
    assert first.text == score(client, LONG).choices[0].text
    assert first.logprobs.tokens == whole.logprobs.tokens[: len(LONG)]
    assert first.logprobs.token_logprobs == whole.logprobs.token_logprobs[: len(LONG)]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.text
    streamed = [
        lp
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for lp in c.choices[0].logprobs.token_logprobs
    ]
    assert streamed == whole.logprobs.token_logprobs
    offsets = [
        o
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for o in c.choices[0].logprobs.text_offset
    ]
    assert offsets[len(LONG) :] == whole.logprobs.text_offset[len(LONG) :]


def test_scored_with_others_equals_scored_alone(client: openai.OpenAI) -> None:
    prompts = [LONG, *SHORT, LONG[:40]]
    alone = [score(client, p).choices[0].logprobs for p in prompts]

    def busy(i: int) -> object:
        if i % 3 == 2:  # a plain completion decoding alongside
            return client.completions.create(
                model="llama", prompt=SHORT[0], max_tokens=30, temperature=0
            )
        return score(client, prompts[i // 3 * 2 + i % 3]).choices[0].logprobs

    with concurrent.futures.ThreadPoolExecutor(9) as pool:
        results = list(pool.map(busy, range(9)))
    together = [r for i, r in enumerate(results) if i % 3 != 2]
    for mine, theirs in zip(together, alone, strict=True):
        assert mine.tokens == theirs.tokens
        assert mine.token_logprobs[1:] == pytest.approx(theirs.token_logprobs[1:], abs=TOLERANCE)


def test_a_repeated_prompt_is_scored_again_not_taken_from_the_prefix_cache(
    client: openai.OpenAI,
) -> None:
    prompt = [9, *LONG[5:70]]
    first = score(client, prompt)
    plain = client.completions.create(model="llama", prompt=prompt, max_tokens=2, temperature=0)
    assert plain.usage.prompt_tokens_details.cached_tokens > 0  # it left its blocks for others
    again = score(client, prompt)
    assert again.usage.prompt_tokens_details.cached_tokens == 0
    assert again.choices[0].logprobs == first.choices[0].logprobs


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"echo": True, "logprobs": 21, "max_tokens": 0}, "logprobs"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"echo": True, "logprobs": -1}, "logprobs"),
    ],
)
def test_out_of_range_asks_are_refused(server: RunningServer, body: dict, param: str) -> None:
    response = post(server, "/v1/completions", json={"prompt": [1, 2, 3], **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_a_failed_scoring_ends_its_own_request_alone(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    cursed = 249
    real = worker.score_chunk

    def failing(logits, targets, top_n):  # noqa: ANN001, ANN202
        if cursed in targets:
            raise RuntimeError("cursed prompt")
        return real(logits, targets, top_n)

    monkeypatch.setattr(worker, "score_chunk", failing)
    body = {"prompt": [3] * 40 + [cursed] + [4] * 40, "echo": True, "logprobs": 1, "max_tokens": 0}
    others = {"prompt": LONG, "echo": True, "logprobs": 1, "max_tokens": 0}
    plain = {"prompt": SHORT[1], "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        bad, good, decoding = pool.map(
            lambda b: httpx.post(server.url + "/v1/completions", json=b, timeout=60),
            [body, others, plain],
        )
    assert bad.status_code == 500 and "cursed prompt" in json.dumps(bad.json())
    assert good.status_code == 200 and len(good.json()["choices"][0]["logprobs"]["tokens"]) == 75
    assert decoding.status_code == 200 and decoding.json()["usage"]["completion_tokens"] == 24
