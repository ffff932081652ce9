"""Speculative decoding served end to end: the same tokens as without it — greedy or seeded,
batched with plain requests, with the prefix cache, quantized KV, sliding windows and a JSON
grammar — its counts in the timings and the metrics, and models that cannot speculate."""

from __future__ import annotations

import concurrent.futures
import json
from collections import Counter
from pathlib import Path

import httpx
import pytest

from ..support.kv_cache import config_for
from ..support.server import get, post, running_server, wait_until
from ..support.speculative import completion

NGRAM = '[models.m.speculative]\nmethod = "ngram"\nnum_draft_tokens = 4\n'
# Prompts that repeat themselves, so prompt lookup has something to draft from.
REPEATING = [(i * 7) % 23 + 3 for i in range(40)] * 3
PROMPTS = [REPEATING, REPEATING[5:], [9, 8, 7, 6] * 10, list(range(3, 60))]


def served(tmp_path: Path, checkpoint: Path, spec: str = NGRAM, kv: str = "") -> object:
    """A server of ``checkpoint`` as "m", speculating as ``spec`` says ("" for plain)."""
    config_for(tmp_path, checkpoint, kv)
    path = tmp_path / "mlxserve.toml"
    path.write_text(path.read_text().replace("[kv_cache]", spec + "[kv_cache]"))
    from ..support.server import write_config

    return running_server(write_config(tmp_path, path.read_text()))


def together(server: object, prompts: list[list[int]], **extra: object) -> list[dict]:
    """Completions of ``prompts`` sent at once (so they share batches)."""
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(lambda p: completion(server, p, **extra), prompts))


def choices(responses: list[dict]) -> list[tuple[str, list[str], list[float]]]:
    return [
        (c["text"], c["logprobs"]["tokens"], c["logprobs"]["token_logprobs"])
        for c in (r["choices"][0] for r in responses)
    ]


def assert_same(plain: list[dict], spec: list[dict], tolerance: float = 1e-4) -> None:
    for (text, tokens, logprobs), (text2, tokens2, logprobs2) in zip(
        choices(plain), choices(spec), strict=True
    ):
        assert (text2, tokens2) == (text, tokens)
        assert logprobs2 == pytest.approx(logprobs, abs=tolerance)  # the target's, to rounding


def drafted(server: object) -> tuple[int, int]:
    speculator = server.engine.workers["m"].speculator
    assert speculator is not None
    return speculator.drafted_tokens, speculator.accepted_tokens


@pytest.mark.parametrize("family", ["llama", "deepseek", "qwen", "mistral"])
def test_greedy_tokens_equal_plain_decoding_in_a_batch(
    tmp_path: Path, tiny_checkpoints: dict[str, Path], family: str
) -> None:
    """Four requests at once (the last has nothing to copy), each row drafting its own
    number of tokens; mistral's sliding window rotates past its 32 tokens."""
    checkpoint = tiny_checkpoints[family]
    with served(tmp_path / "plain", checkpoint, spec="") as server:
        plain = together(server, PROMPTS, max_tokens=40)
    with served(tmp_path / "spec", checkpoint) as server:
        spec = together(server, PROMPTS, max_tokens=40)
        made, accepted = drafted(server)
        steps = server.engine.workers["m"].steps
    assert_same(plain, spec)
    assert made > 0 and accepted > 0
    assert steps < 4 * 40  # accepted drafts saved steps


@pytest.mark.parametrize("model_type", ["gpt_oss", "gemma3_text", "deepseek_v32", "llama4"])
def test_todays_cache_kinds_roll_back_exactly(
    tmp_path: Path, today_checkpoints: dict[str, Path], model_type: str
) -> None:
    """Sliding windows beside full attention, composite and chunked caches."""
    checkpoint = today_checkpoints[model_type]
    with served(tmp_path / "plain", checkpoint, spec="") as server:
        plain = together(server, PROMPTS[:3], max_tokens=40)
    with served(tmp_path / "spec", checkpoint) as server:
        spec = together(server, PROMPTS[:3], max_tokens=40)
        assert drafted(server)[0] > 0
    assert_same(plain, spec)


def test_quantized_kv_and_the_prefix_cache(
    tmp_path: Path, tiny_checkpoints: dict[str, Path]
) -> None:
    """8-bit KV rolls back too; with the prefix cache a repeated prompt reuses only the
    blocks of tokens that were accepted, and gives the same text."""
    checkpoint = tiny_checkpoints["llama"]
    with served(tmp_path / "q", checkpoint, kv="bits = 8\n") as server:
        quantized = together(server, PROMPTS, max_tokens=40)
        assert drafted(server)[1] > 0
    with served(tmp_path / "qplain", checkpoint, spec="", kv="bits = 8\n") as server:
        # quantized keys round differently in batches of other shapes
        assert_same(together(server, PROMPTS, max_tokens=40), quantized, tolerance=1e-3)
    with served(tmp_path / "prefix", checkpoint) as server:
        first = completion(server, REPEATING, max_tokens=40)
        again = completion(server, REPEATING, max_tokens=40)
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 112
        assert again["choices"][0]["text"] == first["choices"][0]["text"]
    with served(tmp_path / "plain", checkpoint, spec="") as server:
        assert (
            choices([completion(server, REPEATING, max_tokens=40)])[0][:2]
            == choices([first])[0][:2]
        )


def test_seeded_sampling_gives_the_same_tokens_with_every_parameter(
    tmp_path: Path, tiny_checkpoints: dict[str, Path]
) -> None:
    """At temperature > 0 each position is drawn as plain decoding draws it (its seed and
    position, penalties over the tokens before it, top-k/p, min-p, logit bias)."""
    sampling = {  # the tiny model's random weights give flat distributions: a cool temperature
        "temperature": 0.05,
        "top_p": 0.95,
        "top_k": 40,
        "min_p": 0.01,
        "frequency_penalty": 0.01,  # applied, but too weak to break the loops it drafts from
        "presence_penalty": 0.01,
        "logit_bias": {"5": 2.0},
    }
    seeded = [dict(sampling, seed=seed) for seed in range(6)]
    checkpoint = tiny_checkpoints["llama"]

    def run(server: object) -> list[dict]:
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            jobs = [pool.submit(completion, server, REPEATING, max_tokens=40, **s) for s in seeded]
            return [job.result() for job in jobs]

    with served(tmp_path / "plain", checkpoint, spec="") as server:
        plain = run(server)
    with served(tmp_path / "spec", checkpoint) as server:
        spec = run(server)
        assert drafted(server)[1] > 0
    assert_same(plain, spec)


def test_sampled_tokens_follow_the_same_distribution(
    tmp_path: Path, tiny_checkpoints: dict[str, Path]
) -> None:
    """Unseeded draws between the two likeliest tokens (the tiny model's distributions are
    flat: a cool temperature makes them differ): at each of the first sixteen positions the
    distribution with speculation is the one without it (total variation within noise)."""
    checkpoint, n, length = tiny_checkpoints["llama"], 160, 16

    def draws(server: object) -> list[Counter[str]]:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            jobs = [
                pool.submit(
                    completion, server, REPEATING, max_tokens=length, temperature=0.02, top_k=2
                )
                for _ in range(n)
            ]
            samples = [j.result()["choices"][0]["logprobs"]["tokens"] for j in jobs]
        return [Counter(s[i] for s in samples) for i in range(length)]

    with served(tmp_path / "plain", checkpoint, spec="") as server:
        plain = draws(server)
    with served(tmp_path / "spec", checkpoint) as server:
        spec = draws(server)
        assert drafted(server)[1] > 0
    assert sum(len(c) > 1 for c in plain) >= 3  # the draws are random at all
    for here, there in zip(plain, spec, strict=True):
        variation = sum(abs(here[k] - there[k]) for k in here.keys() | there.keys()) / (2 * n)
        assert variation < 0.2, (here.most_common(4), there.most_common(4))


def test_a_json_schema_is_followed_and_its_forced_tokens_are_drafted(
    tmp_path: Path, tiny_checkpoints: dict[str, Path]
) -> None:
    schema = {
        "type": "object",
        "properties": {
            "a_rather_long_property_name": {"enum": ["first value", "second value"]},
            "another_long_property_name_here": {"type": "boolean"},
        },
        "required": ["a_rather_long_property_name", "another_long_property_name_here"],
        "additionalProperties": False,
    }
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "Give me the object."}],
        "max_tokens": 300,
        "temperature": 0,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "o", "schema": schema, "strict": True},
        },
    }
    checkpoint = tiny_checkpoints["llama"]
    with served(tmp_path / "plain", checkpoint, spec="") as server:
        plain = post(server, "/v1/chat/completions", json=body).json()
        plain_steps = server.engine.workers["m"].steps
    with served(tmp_path / "spec", checkpoint) as server:
        response = post(server, "/v1/chat/completions", json=body)
        spec_steps = server.engine.workers["m"].steps
        made, accepted = drafted(server)
    assert response.status_code == 200, response.text
    spec = response.json()
    assert spec["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
    json.loads(spec["choices"][0]["message"]["content"])
    assert accepted >= 10 and made >= accepted  # the property names, forced, came at once
    assert spec_steps < plain_steps
    timings = spec["timings"]
    assert timings["draft_tokens"] == made and timings["accepted_tokens"] == accepted
    assert 0 < timings["acceptance_rate"] <= 1


def test_metrics_count_drafted_and_accepted_tokens(
    tmp_path: Path, tiny_checkpoints: dict[str, Path]
) -> None:
    with served(tmp_path, tiny_checkpoints["llama"]) as server:
        completion(server, REPEATING, max_tokens=40)
        made, accepted = drafted(server)
        text = get(server, "/metrics").text
    assert f'mlxserve_speculative_draft_tokens_total{{method="ngram",model="m"}} {made}.0' in text
    line = f'mlxserve_speculative_accepted_tokens_total{{method="ngram",model="m"}} {accepted}.0'
    assert line in text


def test_a_model_with_recurrent_layers_is_served_without_speculation(
    tmp_path: Path, today_checkpoints: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    with served(tmp_path, today_checkpoints["qwen3_next"]) as server:
        assert completion(server, REPEATING)["choices"][0]["text"]
        assert server.engine.workers["m"].speculator is None
    assert "speculative decoding (ngram) is off: its recurrent caches cannot forget" in caplog.text


def test_mtp_without_a_head_is_off_with_a_reason(
    tmp_path: Path, tiny_checkpoints: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    spec = '[models.m.speculative]\nmethod = "mtp"\n'
    with served(tmp_path, tiny_checkpoints["deepseek"], spec=spec) as server:
        assert completion(server, REPEATING)["choices"][0]["text"]
        assert server.engine.workers["m"].speculator is None
    assert (
        "speculative decoding (mtp) is off: no family loads multi-token-prediction" in caplog.text
    )


def test_an_abort_during_verification_frees_everything(
    tmp_path: Path, tiny_checkpoints: dict[str, Path]
) -> None:
    with served(tmp_path, tiny_checkpoints["llama"]) as server:
        worker = server.engine.workers["m"]
        body = {"model": "m", "prompt": REPEATING, "max_tokens": 2000, "temperature": 0}
        body.update(stream=True, ignore_eos=True)
        with httpx.stream("POST", server.url + "/v1/completions", json=body) as response:
            for _ in zip(range(30), response.iter_lines(), strict=False):
                pass  # a few chunks in, the client goes away
        assert wait_until(lambda: not worker.has_work())
        assert drafted(server)[0] > 0
        assert worker.runner.rows == [] and not worker.runner.prefilling
        blocks = worker.scheduler.blocks
        assert not blocks.in_use and not blocks.reserved  # only the prefix cache keeps blocks
        assert completion(server, REPEATING)["choices"][0]["text"]


def test_a_drafting_failure_pauses_drafting_and_fails_no_request(
    tmp_path: Path, tiny_checkpoints: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """A fault in the optimisation turns it off for a while, then it comes back on."""
    checkpoint = tiny_checkpoints["llama"]
    with served(tmp_path / "plain", checkpoint, spec="") as server:
        plain = together(server, PROMPTS, max_tokens=60)
    with served(tmp_path / "spec", checkpoint) as server:
        speculator = server.engine.workers["m"].speculator
        proposer, calls = speculator.proposer, []
        real = proposer.propose

        def fails_once(seqs: list, most: int) -> list[list[int]]:
            calls.append(len(seqs))
            if len(calls) == 1:
                raise RuntimeError("an injected drafting fault")
            return real(seqs, most)

        proposer.propose = fails_once
        spec = together(server, PROMPTS, max_tokens=60)
    assert_same(plain, spec)
    assert "ngram drafting failed; decoding goes on without it for 16 steps" in caplog.text
    assert len(calls) > 1 and speculator.accepted_tokens > 0  # back on after the pause
