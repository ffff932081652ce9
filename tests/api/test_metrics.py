"""GET /metrics: what the engine did, as Prometheus sees it, agrees with the responses."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from ..support.server import RunningServer, get, post, running_server, write_config

KEY = {"Authorization": "Bearer sk-metrics"}
LONG_PROMPT = [7] * 100  # 6 full blocks of 16 can be reused: the last token must be run


def scrape(server: RunningServer) -> list[Sample]:
    response = get(server, "/metrics")  # no API key needed
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return [s for f in text_string_to_metric_families(response.text) for s in f.samples]


def value(samples: list[Sample], name: str, **labels: str) -> float | None:
    found = [s.value for s in samples if s.name == name and labels.items() <= s.labels.items()]
    return sum(found) if found else None


def responses(server: RunningServer) -> list[dict]:
    chat = {"model": "m", "messages": [{"role": "user", "content": "Hi!"}], "temperature": 0}
    eos = sorted(server.engine.workers["m"].model.tokenizer.eos_token_ids)[0]
    long = {"model": "m", "prompt": LONG_PROMPT, "max_tokens": 4, "ignore_eos": True}
    bodies = [
        ("/v1/chat/completions", {**chat, "max_tokens": 5, "ignore_eos": True}),
        ("/v1/chat/completions", {**chat, "logit_bias": {str(eos): 100}}),
        ("/v1/completions", long),
        ("/v1/completions", long),
    ]
    results = []
    for path, body in bodies:
        response = post(server, path, json=body, headers=KEY)
        assert response.status_code == 200, response.text
        results.append(response.json())
    return results


def test_metrics_agree_with_the_responses(tmp_path: Path, tiny_checkpoints) -> None:
    config = write_config(
        tmp_path,
        f'[registry]\ndefault_model = "m"\ncache_dir = "{tmp_path / "cache"}"\n'
        f'[models.m]\nsource = "{tiny_checkpoints["llama"]}"\n'
        '[server]\napi_keys = ["sk-metrics"]\n',
    )
    with running_server(config) as server:
        results = responses(server)
        samples = scrape(server)
    usage = [r["usage"] for r in results]
    reasons = [r["choices"][0]["finish_reason"] for r in results]
    assert reasons == ["length", "stop", "length", "length"]
    cached = [u.get("prompt_tokens_details", {}).get("cached_tokens", 0) for u in usage]
    assert cached[2:] == [0, 96]  # the two chats may share their template's first block

    def total(name: str, **labels: str) -> float | None:
        return value(samples, f"mlxserve_{name}", model="m", **labels)

    assert total("prompt_tokens_total") == sum(u["prompt_tokens"] for u in usage)
    assert total("generation_tokens_total") == sum(u["completion_tokens"] for u in usage)
    assert total("prefix_cache_queried_tokens_total") == sum(u["prompt_tokens"] for u in usage)
    assert total("prefix_cache_hit_tokens_total") == sum(cached)
    assert total("requests_total", finish_reason="length") == 3
    assert total("requests_total", finish_reason="stop") == 1
    assert total("time_to_first_token_seconds_count") == len(results)
    inter_token = sum(u["completion_tokens"] - 1 for u in usage)
    assert total("inter_token_latency_seconds_count") == inter_token
    assert total("time_to_first_token_seconds_sum") > 0
    assert 0 <= total("kv_cache_usage_ratio") <= 1
    assert total("kv_cache_capacity_tokens") > 0
    assert total("requests_running") == 0 and total("requests_waiting") == 0
    assert value(samples, "mlxserve_requests_queued") == 0
    assert total("disk_tier_reads_total") == 0 and total("disk_tier_writes_total") == 0
