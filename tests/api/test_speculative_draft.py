"""Speculative decoding with a draft model: the same tokens as without it (greedy or seeded,
batched with requests that draft nothing), everything accepted from a draft that is the
target itself, a draft of another vocabulary refused, and the KV budget shared with it."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import pytest

from mlxserve.plugins.family import ModelFamily
from mlxserve.plugins.tiny import write_tiny_checkpoint

from ..support.kv_cache import config_for
from ..support.server import running_server, write_config
from ..support.speculative import completion

PROMPTS = [[(i * 7) % 23 + 3 for i in range(40)], list(range(3, 60)), [9, 8, 7, 6] * 10, [5] * 9]


def draft_config(tmp_path: Path, target: Path, draft: Path, kv: str = "", spec: str = "") -> object:
    """``target`` served as "m", drafting with ``draft`` (served as "d")."""
    config_for(tmp_path, target, kv)
    models = (
        f'[models.m.speculative]\nmethod = "draft"\ndraft_model = "d"\n{spec}'
        f'[models.d]\nsource = "{draft}"\n'
    )
    text = (tmp_path / "mlxserve.toml").read_text().replace("[kv_cache]", models + "[kv_cache]")
    return write_config(tmp_path, text)


def batch(server: object, requests: list[tuple[list[int], dict]]) -> list[list[str]]:
    """The tokens of each request, all sent at once."""
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        done = pool.map(lambda r: completion(server, r[0], **r[1]), requests)
        return [r["choices"][0]["logprobs"]["tokens"] for r in done]


@pytest.fixture(scope="module")
def other_llama(
    tmp_path_factory: pytest.TempPathFactory, builtin_families: dict[str, ModelFamily]
) -> Path:
    """A tiny llama with the tiny llama's tokenizer and other random weights."""
    return write_tiny_checkpoint(
        builtin_families["llama"], tmp_path_factory.mktemp("draft") / "llama", seed=1
    )


# Four greedy requests, and one that stops before it could draft anything.
GREEDY = [(p, {}) for p in PROMPTS] + [(PROMPTS[0][3:], {"max_tokens": 2})]
# Hot and cool ones: a greedy draft agrees with the cool ones' samples now and then.
SEEDED = [
    (p, {"temperature": t, "top_p": 0.95, "seed": 11 + i})
    for i, (p, t) in enumerate(zip(PROMPTS, [0.9, 0.1, 0.05, 0.9], strict=True))
]


@pytest.mark.parametrize("requests", [GREEDY, SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("same", [False, True], ids=["other-draft", "target-as-draft"])
def test_tokens_equal_plain_decoding_batched(
    tmp_path: Path,
    tiny_checkpoints: dict[str, Path],
    other_llama: Path,
    requests: list[tuple[list[int], dict]],
    same: bool,
) -> None:
    """A draft of other weights is rejected throughout (random weights agree on nothing);
    the target itself, drafting greedily for seeded sampling, is accepted in part."""
    target = tiny_checkpoints["llama"]
    draft = target if same else other_llama
    with running_server(config_for(tmp_path / "plain", target)) as server:
        plain = batch(server, requests)
    # a tiny draft costs what the tiny target does: adaptive drafting would hardly ever draft
    config = draft_config(tmp_path / "draft", target, draft, spec="adaptive = false\n")
    with running_server(config) as server:
        drafted = batch(server, requests)
        speculator = server.engine.workers["m"].speculator
    assert speculator is not None and speculator.method == "draft"
    assert speculator.drafted_tokens > 0
    if same and requests is SEEDED:
        assert 0 < speculator.accepted_tokens < speculator.drafted_tokens
    assert drafted == plain


def test_a_draft_that_is_the_target_is_always_accepted(
    tmp_path: Path, tiny_checkpoints: dict[str, Path]
) -> None:
    target = tiny_checkpoints["llama"]
    config = draft_config(tmp_path, target, target, spec="adaptive = false\n")
    with running_server(config) as server:
        batch(server, [(p, {"max_tokens": 30}) for p in PROMPTS])
        batch(server, [(PROMPTS[1] + PROMPTS[0], {})])  # and a sequence it drafted for before
        speculator = server.engine.workers["m"].speculator
    assert speculator is not None
    assert speculator.accepted_tokens == speculator.drafted_tokens > 0


def test_a_draft_of_another_vocabulary_is_refused(
    tmp_path: Path,
    tiny_checkpoints: dict[str, Path],
    builtin_families: dict[str, ModelFamily],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from mlxserve.registry.models import load_tokenizer_of

    llama, qwen = tiny_checkpoints["llama"], tiny_checkpoints["qwen"]
    vocabularies = [load_tokenizer_of(p, None).get_vocab() for p in (llama, qwen)]
    assert vocabularies[0] != vocabularies[1]
    with running_server(draft_config(tmp_path, llama, qwen)) as server:
        assert server.engine.workers["m"].speculator is None
        plain = completion(server, PROMPTS[0])
    assert plain["usage"]["completion_tokens"] == 24
    assert "speculative decoding (draft) is off" in caplog.text
    assert "draft model 'd' and model 'm' have different vocabularies" in caplog.text


def test_the_kv_budget_holds_the_draft_models_caches_too(
    tmp_path: Path, tiny_checkpoints: dict[str, Path], other_llama: Path
) -> None:
    budget = 8 * 2**20
    kv = f'budget = "{budget // 2**20}MB"\n'
    target = tiny_checkpoints["llama"]
    with running_server(config_for(tmp_path / "plain", target, kv)) as server:
        worker = server.engine.workers["m"]
        alone, per_token = worker.capacity_tokens, worker._measure_caches()[0]
    with running_server(draft_config(tmp_path / "draft", target, other_llama, kv)) as server:
        worker = server.engine.workers["m"]
        assert worker.speculator is not None
        drafting = worker.speculator.proposer.kv_bytes_per_token()
        shared = worker.capacity_tokens
    assert drafting == per_token  # the same architecture
    assert alone == budget // per_token // 16 * 16
    assert shared == budget // (per_token + drafting) // 16 * 16


def test_a_draft_model_as_costly_as_the_target_is_seldom_asked(
    tmp_path: Path, tiny_checkpoints: dict[str, Path], other_llama: Path
) -> None:
    """Adaptive drafting weighs a draft model's own steps: a draft the size of the target
    (and never right) cannot pay, so it is asked for a token only now and then, to learn."""
    target = tiny_checkpoints["llama"]
    with running_server(config_for(tmp_path / "plain", target)) as server:
        plain = batch(server, GREEDY[:1])
    with running_server(draft_config(tmp_path / "draft", target, other_llama)) as server:
        drafted = batch(server, GREEDY[:1])
        speculator = server.engine.workers["m"].speculator
        steps = server.engine.workers["m"].steps
    assert drafted == plain
    assert speculator.drafted_tokens <= 1 + steps // 32
