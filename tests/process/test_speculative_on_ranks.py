"""Speculative decoding on two ranks (``mlxserve launch``, pipeline with its micro-batches, and
tensor): the same tokens as one rank without it, drafts accepted and counted."""

from __future__ import annotations

import concurrent.futures
import re
from pathlib import Path

import httpx
import pytest

from ..support.processes import launched, two_ranks_config
from ..support.server import running_server, write_config

PROMPTS = [[(i * 7) % 23 + 3 for i in range(40)] * 3, [9, 8, 7, 6] * 10, list(range(3, 60))]
NGRAM = '[models.m.speculative]\nmethod = "ngram"\n'


def completions(url: str) -> list[str]:
    def one(prompt: list[int]) -> str:
        body = {"model": "m", "prompt": prompt, "max_tokens": 40, "temperature": 0}
        response = httpx.post(
            url + "/v1/completions", json=body | {"ignore_eos": True}, timeout=120
        )
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"]

    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        return list(pool.map(one, PROMPTS))


def on_one_rank(tmp_path: Path, checkpoint: Path) -> list[str]:
    """The completions of one rank without speculation: the reference."""
    (tmp_path / "one").mkdir()
    one_rank = (
        f'[registry]\ndefault_model = "m"\ncache_dir = "{tmp_path / "cache1"}"\n'
        f'[models.m]\nsource = "{checkpoint}"\n'
    )
    with running_server(write_config(tmp_path / "one", one_rank)) as server:
        return completions(server.url)


@pytest.mark.parametrize("strategy", ["pipeline", "tensor"])
def test_two_ranks_speculate_with_the_tokens_of_one(
    tmp_path: Path, tiny_checkpoints: dict[str, Path], strategy: str
) -> None:
    checkpoint = tiny_checkpoints["llama"]
    expected = on_one_rank(tmp_path, checkpoint)
    text = two_ranks_config(tmp_path, checkpoint, f'strategy = "{strategy}"\n')
    text = text.replace("[distributed]", NGRAM + "[distributed]")
    with launched(tmp_path, text) as (url, _):
        texts = completions(url)
        metrics = httpx.get(url + "/metrics").text
    assert texts == expected
    accepted = re.search(
        r'speculative_accepted_tokens_total\{method="ngram",model="m"\} (\S+)', metrics
    )
    assert accepted and float(accepted[1]) > 0, metrics


@pytest.mark.parametrize("strategy", ["pipeline", "tensor"])
def test_a_draft_model_drafts_on_rank_zero_alone(
    tmp_path: Path, tiny_checkpoints: dict[str, Path], strategy: str
) -> None:
    """The target (its own draft here: always accepted) is shared by the ranks; the draft
    runs whole on rank 0."""
    checkpoint = tiny_checkpoints["llama"]
    expected = on_one_rank(tmp_path, checkpoint)
    drafting = (
        '[models.m.speculative]\nmethod = "draft"\ndraft_model = "d"\nadaptive = false\n'
        f'[models.d]\nsource = "{checkpoint}"\n'
    )
    text = two_ranks_config(tmp_path, checkpoint, f'strategy = "{strategy}"\n')
    with launched(tmp_path, text.replace("[distributed]", drafting + "[distributed]")) as (
        url,
        _,
    ):
        texts = completions(url)
        metrics = httpx.get(url + "/metrics").text
    assert texts == expected
    counted = r'speculative_(draft|accepted)_tokens_total\{method="draft",model="m"\} (\S+)'
    found = dict(re.findall(counted, metrics))
    assert float(found["draft"]) > 0 and found["accepted"] == found["draft"], metrics
