"""Today's model types served through a real server, against mlx-lm's own generation: greedy
tokens equal, concurrent requests equal one at a time, a repeated prompt answered the same
(from the prefix cache, recurrent and composite caches included; /metrics says where not)."""

from __future__ import annotations

import concurrent.futures
import re
from collections.abc import Iterator

import httpx
import openai
import pytest

from mlxserve.plugins.tiny import write_tiny_checkpoint

from ..conftest import TODAY_TYPES
from ..support.engine import mlx_lm_greedy
from ..support.server import RunningServer, running_server, write_config

PROMPTS = [[5, 9, 77, 120, 33, 8, 250, 19], [42] * 40, list(range(3, 70)), [300, 7] * 13]
MAX_TOKENS = 12
# DeepSeek V4.1's own caches have no blocks: no prefix cache.
NO_PREFIX_CACHE = {"deepseek_v41"}
# Hybrid models whose full-attention layers take a quantized KV cache beside other kinds.
QUANTIZED = ["qwen3_next", "gemma3_text"]


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, today_checkpoints, plugins
) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("today-server")
    models = "".join(f'[models.{t}]\nsource = "{path}"\n' for t, path in today_checkpoints.items())
    for t in QUANTIZED:  # heads of 32: MLX quantizes in groups of at least 32
        family = plugins.family_for(t)
        source = write_tiny_checkpoint(family, tmp / t, model_type=t, overrides={"head_dim": 32})
        models += f'[models.{t}_h32]\nsource = "{source}"\n'
        models += f'[models.{t}_q8]\nsource = "{source}"\n[models.{t}_q8.kv_cache]\nbits = 8\n'
    models += f'[models.narrow_q8]\nsource = "{today_checkpoints["qwen3_next"]}"\n'
    models += "[models.narrow_q8.kv_cache]\nbits = 8\n"
    sinks = write_tiny_checkpoint(
        plugins.family_for("gpt_oss"),
        tmp / "sinks",
        model_type="gpt_oss",
        overrides={"head_dim": 32},
    )
    models += f'[models.sinks_q8]\nsource = "{sinks}"\n[models.sinks_q8.kv_cache]\nbits = 8\n'

    config = write_config(
        tmp,
        f'[registry]\ndefault_model = "phi3"\ncache_dir = "{tmp / "cache"}"\n'
        f"max_loaded_models = {len(today_checkpoints) + 2 * len(QUANTIZED) + 2}\n{models}"
        "[kv_cache]\nmax_sequence_length = 512\nreserved_memory_mb = 0\n",
    )
    with running_server(config) as running:
        yield running


def complete(server: RunningServer, model: str, prompt: list[int]) -> tuple[str, int]:
    """Greedy text of a token-id prompt through the official client; and its cached tokens."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", timeout=120)
    reply = client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    details = reply.usage.prompt_tokens_details if reply.usage else None
    return reply.choices[0].text, (details.cached_tokens or 0) if details else 0


@pytest.mark.parametrize("model_type", list(TODAY_TYPES))
def test_greedy_tokens_equal_mlx_lm(
    model_type: str, server: RunningServer, today_checkpoints
) -> None:
    for prompt in PROMPTS[:3]:
        text, _ = complete(server, model_type, prompt)
        assert text == mlx_lm_greedy(
            today_checkpoints[model_type], prompt, MAX_TOKENS, stop_at_eos=False
        ), prompt


@pytest.mark.parametrize("model_type", list(TODAY_TYPES))
def test_concurrent_requests_equal_one_at_a_time(model_type: str, server: RunningServer) -> None:
    alone = [complete(server, model_type, p)[0] for p in PROMPTS]
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(lambda p: complete(server, model_type, p)[0], PROMPTS))
    assert together == alone


@pytest.mark.parametrize("model_type", list(TODAY_TYPES))
def test_a_repeated_prompt_is_answered_the_same(model_type: str, server: RunningServer) -> None:
    prompt = [11, *range(100, 166)]
    first, _ = complete(server, model_type, prompt)
    again, cached = complete(server, model_type, prompt)
    assert again == first
    metrics = httpx.get(server.url + "/metrics", timeout=30).text
    enabled = re.search(rf'mlxserve_prefix_cache_enabled\{{model="{model_type}"\}} (\S+)', metrics)
    assert enabled is not None
    if model_type in NO_PREFIX_CACHE:
        assert cached == 0 and float(enabled.group(1)) == 0.0
    else:  # recurrent state too: copied at the prompt's last whole block
        assert cached == 64 and float(enabled.group(1)) == 1.0


def test_the_families_claim_todays_types(plugins) -> None:
    for model_type, family in TODAY_TYPES.items():
        assert plugins.family_for(model_type).name == family, model_type


@pytest.mark.parametrize("model_type", sorted(set(TODAY_TYPES) - NO_PREFIX_CACHE))
def test_a_longer_prompt_reuses_the_shared_start_exactly(
    model_type: str, server: RunningServer, today_checkpoints
) -> None:
    """A second turn: the first turn's prompt and more. Its start comes from the prefix cache
    (for recurrent layers, the state copied at the first prompt's last whole block), and its
    answer is mlx-lm's for the whole prompt."""
    first = [29, *range(200, 250)]  # 51 tokens: its state is copied at 48
    complete(server, model_type, first)
    longer = [*first, *range(400, 430)]
    text, cached = complete(server, model_type, longer)
    assert cached == 48
    assert text == mlx_lm_greedy(
        today_checkpoints[model_type], longer, MAX_TOKENS, stop_at_eos=False
    )


@pytest.mark.parametrize("model_type", QUANTIZED)
def test_quantized_kv_in_a_hybrid_model_stays_close(model_type: str, server: RunningServer) -> None:
    """8-bit keys and values in the full-attention layers, the other kinds as they are: the
    greedy text starts the same as with full precision, and concurrent requests still equal
    one at a time."""
    exact, _ = complete(server, f"{model_type}_h32", PROMPTS[0])
    quantized, cached = complete(server, f"{model_type}_q8", PROMPTS[0])
    assert quantized[:4] == exact[:4] and cached == 0
    alone = [complete(server, f"{model_type}_q8", p)[0] for p in PROMPTS]
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(lambda p: complete(server, f"{model_type}_q8", p)[0], PROMPTS))
    assert together == alone


def test_quantized_kv_a_model_cannot_take_is_a_422_naming_the_key(server: RunningServer) -> None:
    """Heads of 16 (MLX quantizes in groups of at least 32), and gpt-oss's attention sinks
    (mlx-lm's quantized attention has none)."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.UnprocessableEntityError, match=r"\[kv_cache\] bits .* 16"):
        client.completions.create(model="narrow_q8", prompt=[5, 6], max_tokens=2)
    with pytest.raises(openai.UnprocessableEntityError, match=r"\[kv_cache\] bits = 8 .*sinks"):
        client.completions.create(model="sinks_q8", prompt=[5, 6], max_tokens=2)
