"""Each model runs with its own merged KV settings: `[kv_cache]` + `[models.NAME.kv_cache]`."""

from __future__ import annotations

from pathlib import Path

from mlxserve.core.kv.quantized import QuantizedCache

from ..support.server import post, running_server, write_config


def test_per_model_kv_cache_settings_apply_to_that_model_only(
    tmp_path: Path, tiny_checkpoints: dict[str, Path]
) -> None:
    config = write_config(
        tmp_path,
        f'[registry]\ndefault_model = "a"\ncache_dir = "{tmp_path / "cache"}"\n'
        "max_loaded_models = 2\n"
        f'[models.a]\nsource = "{tiny_checkpoints["llama"]}"\n'
        "[models.a.kv_cache]\nbits = 8\nmax_sequence_length = 64\n"
        f'[models.b]\nsource = "{tiny_checkpoints["llama"]}"\n'
        "[kv_cache]\nmax_sequence_length = 256\n",
    )
    body = {"prompt": [5, 9, 77, 120] * 10, "max_tokens": 40, "temperature": 0}
    with running_server(config) as server:
        answers = {m: post(server, "/v1/completions", json={**body, "model": m}) for m in "ab"}
        a, b = (server.engine.workers[m] for m in "ab")
        assert all(isinstance(c, QuantizedCache) and c.bits == 8 for c in a.runner.make_cache())
        assert not any(isinstance(c, QuantizedCache) for c in b.runner.make_cache())
    assert answers["b"].status_code == 200
    assert answers["a"].status_code == 400  # 40 + 40 tokens: past a's 64
    assert "64" in answers["a"].json()["error"]["message"]
