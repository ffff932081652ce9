"""The KV cache served end to end: the prefix cache, the budget (queueing, refusing what can
never fit), sliding-window models, the disk tier (composite and chunked caches too), quantized
KV."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import pytest

from mlxserve.core.kv.blocks import block_hashes

from ..support.kv_cache import PROMPT, complete, config_for, disk_config
from ..support.server import post, running_server, wait_until, write_config


@pytest.mark.parametrize("family", ["llama", "deepseek"])
def test_a_repeated_prefix_is_reused_and_gives_the_same_tokens(
    tmp_path: Path, tiny_checkpoints: dict[str, Path], family: str
) -> None:
    prompt = [(i * 7) % 300 + 3 for i in range(100)]
    with running_server(config_for(tmp_path, tiny_checkpoints[family])) as server:
        cold = complete(server, prompt)
        assert cold["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        warm = complete(server, prompt)
        assert warm["usage"]["prompt_tokens_details"]["cached_tokens"] == 96
        assert warm["choices"][0]["text"] == cold["choices"][0]["text"]
        other = complete(server, prompt[:40] + [5] * 60)
        assert other["usage"]["prompt_tokens_details"]["cached_tokens"] == 32
    with running_server(config_for(tmp_path / "x", tiny_checkpoints[family])) as fresh:
        assert complete(fresh, prompt[:40] + [5] * 60)["choices"] == other["choices"]


def test_sliding_window_models_reuse_prefixes_up_to_a_copied_window(
    tmp_path: Path, tiny_checkpoints: dict[str, Path]
) -> None:
    """Mistral's 32-token windows rotate, so its blocks alone cannot be reused: the window is
    copied where the prompt's last whole block ends, and a repeat (or a longer prompt that
    starts the same) reuses up to there, with the same text as a cold run."""
    prompt = list(range(3, 100))  # 97 tokens: the window is copied at 96
    with running_server(config_for(tmp_path, tiny_checkpoints["mistral"])) as server:
        cold = complete(server, prompt)
        again = complete(server, prompt)
        longer = complete(server, [*prompt, 7, 8, 9])
    with running_server(config_for(tmp_path / "fresh", tiny_checkpoints["mistral"])) as fresh:
        longer_cold = complete(fresh, [*prompt, 7, 8, 9])
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 96
    assert again["choices"][0]["text"] == cold["choices"][0]["text"]
    assert longer["usage"]["prompt_tokens_details"]["cached_tokens"] == 96
    assert longer["choices"][0]["text"] == longer_cold["choices"][0]["text"]


def test_a_small_budget_queues_instead_of_running_out(
    tmp_path: Path, tiny_checkpoints: dict[str, Path]
) -> None:
    config = config_for(
        tmp_path, tiny_checkpoints["llama"], "budget = 512\nmax_sequence_length = 256\n"
    )
    prompts = [[i + 3] * 100 for i in range(6)]
    with running_server(config) as server:
        worker = server.engine.workers["m"]
        alone = [complete(server, p, 100)["choices"][0]["text"] for p in prompts[:2]]
        peak = []
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(complete, server, p, 100) for p in prompts]
            while not all(f.done() for f in futures):
                peak.append(worker.scheduler.num_active)
                blocks = worker.scheduler.blocks
                assert blocks.used_blocks <= blocks.num_blocks
            texts = [f.result()["choices"][0]["text"] for f in futures]
        assert max(peak) <= 2  # 512 tokens hold two sequences of 200
        assert texts[:2] == alone
        too_big = post(
            server, "/v1/completions", json={"model": "m", "prompt": [5] * 200, "max_tokens": 400}
        )
        assert too_big.status_code == 400


def test_a_request_that_can_never_get_its_blocks_is_refused_at_once(
    tmp_path: Path, tiny_checkpoints: dict[str, Path]
) -> None:
    config = write_config(
        tmp_path,
        f'[registry]\ndefault_model = "m"\ncache_dir = "{tmp_path / "cache"}"\n'
        f'[models.m]\nsource = "{tiny_checkpoints["llama"]}"\n'
        "[server]\nrequest_timeout_s = 20\n"
        "[kv_cache]\nbudget = 100\nmax_sequence_length = 100\nblock_size = 16\n",
    )
    with running_server(config) as server:
        body = {"model": "m", "prompt": [7] * 97, "max_tokens": 1}
        refused = post(server, "/v1/completions", json=body)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["code"] == "context_length_exceeded"
        assert "96" in refused.json()["error"]["message"]
        fits = post(server, "/v1/completions", json={**body, "prompt": [7] * 90, "max_tokens": 6})
        assert fits.status_code == 200, fits.text


def test_the_disk_tier_survives_a_restart(tmp_path: Path, tiny_checkpoints) -> None:
    config = disk_config(tmp_path, tiny_checkpoints["llama"], 'disk_write = "all"\n')
    with running_server(config) as server:
        cold = complete(server, PROMPT)
        store = server.engine.workers["m"].runner.prefix_store
        assert wait_until(lambda: store.disk.writes == 6)  # 111 tokens have KV: 6 blocks
    files = list((tmp_path / "kv").rglob("*.safetensors"))
    assert len(files) == 6
    with running_server(config) as server:
        warm = complete(server, PROMPT)
        assert server.engine.workers["m"].runner.prefix_store.disk.reads == 6
    assert warm["usage"]["prompt_tokens_details"]["cached_tokens"] == 96
    assert warm["choices"] == cold["choices"]


@pytest.mark.parametrize("model_type", ["deepseek_v32", "llama4"])
def test_composite_and_chunked_caches_survive_a_restart_on_disk(
    model_type: str, tmp_path: Path, today_checkpoints
) -> None:
    """DeepSeek V3.2's latent + indexer keys (a block holds both) and Llama 4's chunked and
    full layers go to disk and come back, giving the same text."""
    config = disk_config(tmp_path, today_checkpoints[model_type], 'disk_write = "all"\n')
    with running_server(config) as server:
        cold = complete(server, PROMPT)
        store = server.engine.workers["m"].runner.prefix_store
        assert wait_until(lambda: store.disk.writes == 6)
    with running_server(config) as server:
        warm = complete(server, PROMPT)
        assert server.engine.workers["m"].runner.prefix_store.disk.reads == 6
    assert warm["usage"]["prompt_tokens_details"]["cached_tokens"] == 96
    assert warm["choices"] == cold["choices"]


def test_a_corrupt_block_file_is_ignored(tmp_path: Path, tiny_checkpoints) -> None:
    config = disk_config(tmp_path, tiny_checkpoints["llama"], 'disk_write = "all"\n')
    with running_server(config) as server:
        cold = complete(server, PROMPT)
        key = server.engine.workers["m"].key
        assert wait_until(lambda: server.engine.workers["m"].runner.prefix_store.disk.writes == 6)
    third = block_hashes(PROMPT, 16, key)[2]
    [corrupt] = list((tmp_path / "kv").rglob(f"{third}.safetensors"))
    data = bytearray(corrupt.read_bytes())
    data[-20:] = bytes(20)  # change the weights, keep the header
    corrupt.write_bytes(bytes(data))
    with running_server(config) as server:
        warm = complete(server, PROMPT)
    assert warm["usage"]["prompt_tokens_details"]["cached_tokens"] == 32  # blocks 0 and 1
    assert warm["choices"] == cold["choices"]
    assert corrupt.read_bytes() != bytes(data)  # dropped, then written again from good KV


def test_evicted_blocks_go_to_disk_and_come_back(tmp_path: Path, tiny_checkpoints) -> None:
    config = disk_config(
        tmp_path, tiny_checkpoints["llama"], "budget = 256\nmax_sequence_length = 256\n"
    )
    with running_server(config) as server:
        cold = complete(server, PROMPT)
        store = server.engine.workers["m"].runner.prefix_store
        assert store.disk.writes == 0
        complete(server, [7] * 200, 50)  # needs all 16 blocks: the first prompt's 6 go
        assert wait_until(lambda: store.disk.writes == 6)
        warm = complete(server, PROMPT)
        assert warm["usage"]["prompt_tokens_details"]["cached_tokens"] == 96
        assert warm["choices"] == cold["choices"]


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_kv_batches_like_one_at_a_time(
    tmp_path: Path, tiny_checkpoints: dict[str, Path], bits: int, caplog: pytest.LogCaptureFixture
) -> None:
    config = config_for(tmp_path, tiny_checkpoints["llama"], f"bits = {bits}\n")
    prompts = [[i + 3] * (20 + 9 * i) for i in range(5)]
    with running_server(config) as server:
        cache = server.engine.workers["m"].runner.make_cache()
        assert all(c.bits == bits for c in cache)
        alone = [complete(server, p, 30)["choices"][0]["text"] for p in prompts]
        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            together = list(pool.map(lambda p: complete(server, p, 30), prompts))
        again = complete(server, prompts[-1], 30)
    assert [r["choices"][0]["text"] for r in together] == alone
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert "prefix caching is off" in caplog.text


def test_a_models_context_is_its_checkpoints_unless_set(
    tmp_path: Path, plugins, caplog: pytest.LogCaptureFixture
) -> None:
    """A checkpoint trained for 8,192 tokens takes a 6,000-token prompt by default (it was cut
    to 4,096 for every model); a configured max_sequence_length, or a budget smaller than the
    context, still limits it (the budget with a warning)."""
    from mlxserve.plugins.families.llama import Llama
    from mlxserve.plugins.tiny import write_tiny_checkpoint

    checkpoint = write_tiny_checkpoint(
        Llama(), tmp_path / "long", overrides={"max_position_embeddings": 8192}
    )
    prompt = [(i * 13) % 400 + 3 for i in range(6000)]
    with running_server(config_for(tmp_path / "a", checkpoint)) as server:
        long = post(
            server, "/v1/completions", json={"model": "m", "prompt": prompt, "max_tokens": 4}
        )
    assert long.status_code == 200, long.text
    limited = config_for(tmp_path / "b", checkpoint, "max_sequence_length = 4096\n")
    budget = config_for(tmp_path / "c", checkpoint, "budget = 2048\n")
    for config in (limited, budget):
        with running_server(config) as server:
            refused = post(server, "/v1/completions", json={"model": "m", "prompt": prompt})
        assert refused.status_code == 400
        assert refused.json()["error"]["code"] == "context_length_exceeded"
    assert "KV budget holds 2048 tokens, fewer than its context of 8192" in caplog.text


def test_a_context_set_past_the_checkpoints_is_served_with_a_warning(
    tmp_path: Path, plugins, caplog: pytest.LogCaptureFixture
) -> None:
    """An operator may run a model past the context it was trained for (an agent's prompt
    longer than a small model's 8k, say): rotary positions go on; the log says so."""
    from mlxserve.plugins.families.llama import Llama
    from mlxserve.plugins.tiny import write_tiny_checkpoint

    checkpoint = write_tiny_checkpoint(
        Llama(), tmp_path / "short", overrides={"max_position_embeddings": 256}
    )
    prompt = [(i * 13) % 400 + 3 for i in range(600)]
    body = {"model": "m", "prompt": prompt, "max_tokens": 4}
    with running_server(config_for(tmp_path / "a", checkpoint)) as server:
        assert post(server, "/v1/completions", json=body).status_code == 400
    longer = config_for(tmp_path / "b", checkpoint, "max_sequence_length = 1024\n")
    with running_server(longer) as server:
        served = post(server, "/v1/completions", json=body)
    assert served.status_code == 200, served.text
    assert "max_sequence_length 1024 is past the 256 tokens it was trained for" in caplog.text
