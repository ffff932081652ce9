"""Speculative decoding served end to end: the same tokens as without it, whatever else is in
the batch, and its counts in the usage, the timings and the metrics."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import pytest

from ..support.kv_cache import config_for
from ..support.server import post, running_server

NGRAM = "\n[models.m.speculative]\nmethod = \"ngram\"\nnum_draft_tokens = 4\n"
# A prompt that repeats itself, so prompt lookup has something to draft from.
REPEATING = [(i * 7) % 23 + 3 for i in range(40)] * 3


def spec_config(tmp_path: Path, checkpoint: Path, spec: str = NGRAM, kv: str = "") -> object:
    config = config_for(tmp_path, checkpoint, kv)
    text = (tmp_path / "mlxserve.toml").read_text().replace("[kv_cache]", spec + "[kv_cache]")
    (tmp_path / "mlxserve.toml").write_text(text)
    from ..support.server import write_config

    return write_config(tmp_path, text)


def completion(server: object, prompt: list[int], **extra: object) -> dict:
    body = {"model": "m", "prompt": prompt, "max_tokens": 24, "temperature": 0}
    body.update(extra)
    body.setdefault("ignore_eos", True)
    response = post(server, "/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def tokens_of(server: object, prompts: list[list[int]], **extra: object) -> list[dict]:
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(lambda p: completion(server, p, logprobs=1, **extra), prompts))


@pytest.mark.parametrize("family", ["llama", "deepseek", "qwen"])
def test_greedy_tokens_equal_plain_decoding_batched(
    tmp_path: Path, tiny_checkpoints: dict[str, Path], family: str
) -> None:
    prompts = [REPEATING, REPEATING[5:], [9, 8, 7, 6] * 10, list(range(3, 60))]
    with running_server(config_for(tmp_path / "plain", tiny_checkpoints[family])) as server:
        plain = tokens_of(server, prompts)
    config = spec_config(tmp_path / "spec", tiny_checkpoints[family])
    with running_server(config) as server:
        spec = tokens_of(server, prompts)
        speculator = server.engine.workers["m"].speculator
        print(speculator.drafted_tokens, speculator.accepted_tokens, server.engine.workers["m"].steps)
    for a, b in zip(plain, spec, strict=True):
        assert b["choices"][0]["text"] == a["choices"][0]["text"]
        assert b["choices"][0]["logprobs"]["tokens"] == a["choices"][0]["logprobs"]["tokens"]
    drafted = sum(r["usage"].get("completion_tokens_details", {}) and 0 for r in spec)
    assert drafted == 0
