"""Two real ranks on loopback (mlx.launch, ring backend), started by ``mlxserve launch``."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from mlxserve.core.distributed.ranks import SLOW_STEP_ENV

from ..support.processes import (
    PROMPTS,
    completion,
    launched,
    rank_pids,
    run_on_two_ranks,
    single_rank_texts,
    two_ranks_config,
)
from ..support.server import running_server, write_config

FAMILIES = ["llama", "qwen", "mistral", "deepseek"]


@pytest.mark.parametrize("family", FAMILIES)
def test_two_pipeline_ranks_equal_one(family: str, tmp_path: Path, tiny_checkpoints) -> None:
    expected = single_rank_texts(tmp_path, tiny_checkpoints[family])
    text = two_ranks_config(tmp_path, tiny_checkpoints[family], 'strategy = "pipeline"\n')
    with launched(tmp_path, text) as (url, _):
        health = httpx.get(url + "/health").json()
        stages = health["placement"]["m"]["stages"]
        assert [s["layers"] for s in stages] == [[2, 3], [0, 1]]
        assert [completion(url, p) for p in PROMPTS] == expected
        body = {"prompt": PROMPTS[2], "max_tokens": 24, "temperature": 0, "ignore_eos": True}
        again = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
        cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached == 64  # each rank kept its own blocks (and Mistral's windows)
        assert again["choices"][0]["text"] == expected[2]


@pytest.mark.parametrize("model_type", ["qwen3_next", "deepseek_v32", "llama4", "gpt_oss"])
def test_two_pipeline_ranks_equal_one_for_each_cache_kind(
    model_type: str, tmp_path: Path, today_checkpoints
) -> None:
    """Recurrent, composite, chunked and sliding caches, each cut into two stages; a repeated
    prompt comes from each rank's prefix cache (recurrent state copies included)."""
    checkpoint = today_checkpoints[model_type]
    expected = single_rank_texts(tmp_path, checkpoint)
    text = two_ranks_config(tmp_path, checkpoint, 'strategy = "pipeline"\n')
    with launched(tmp_path, text) as (url, _):
        stages = httpx.get(url + "/health").json()["placement"]["m"]["stages"]
        assert [s["layers"] for s in stages] == [[2, 3], [0, 1]]
        assert [completion(url, p) for p in PROMPTS] == expected
        body = {"prompt": PROMPTS[2], "max_tokens": 24, "temperature": 0, "ignore_eos": True}
        again = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
        cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached == 64
        assert again["choices"][0]["text"] == expected[2]


# Short and long prompts; with 16-token prefill chunks the long ones take several steps.
MIXED = [[7, 3, 99, 14], list(range(10, 80)), [200] * 5, list(range(300, 345)), [11] * 12]
SMALL_CHUNKS = "[performance]\nprefill_step_size = 16\n"


def stream_text(url: str, body: dict[str, Any], started: threading.Event | None = None) -> str:
    """A streamed completion's text (``started`` is set at its first token)."""
    text = ""
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            text += json.loads(line[6:])["choices"][0]["text"]
            if started is not None:
                started.set()
    return text


def staggered(url: str, prompts: list[list[int]], max_tokens: int) -> list[str]:
    """Every other prompt starts at once; the rest join once those are decoding."""
    texts = [""] * len(prompts)
    first = [threading.Event() for _ in prompts]

    def run(i: int) -> None:
        body = {"prompt": prompts[i], "max_tokens": max_tokens, "temperature": 0}
        texts[i] = stream_text(url, {**body, "ignore_eos": True, "stream": True}, first[i])

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(prompts))]
    for thread in threads[::2]:
        thread.start()
    for event in first[::2]:
        assert event.wait(60), "a first stream never started"
    for thread in threads[1::2]:
        thread.start()
    for thread in threads:
        thread.join(120)
    return texts


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + '{model="m"}'):
            return float(line.split()[-1])
    raise AssertionError(f"no {name} for model m")


@pytest.mark.parametrize("family", FAMILIES)
def test_micro_batches_equal_one_rank(family: str, tmp_path: Path, tiny_checkpoints) -> None:
    """Two lanes in flight on two pipeline ranks, prompts joining mid-stream, prefill in
    chunks, then the same again from the prefix cache: every text as on one rank alone."""
    checkpoint = tiny_checkpoints[family]
    expected = single_rank_texts(tmp_path, checkpoint, MIXED, 20, SMALL_CHUNKS)
    text = two_ranks_config(tmp_path, checkpoint, 'strategy = "pipeline"\n') + SMALL_CHUNKS
    with launched(tmp_path, text) as (url, _):
        assert staggered(url, MIXED, 20) == expected
        assert metric(url, "mlxserve_micro_batches") == 2
        assert metric(url, "mlxserve_overlapped_steps_total") > 10
        assert staggered(url, MIXED, 20) == expected  # now from the prefix cache
        hits = metric(url, "mlxserve_prefix_cache_hit_tokens_total")
        assert hits > 0


def test_micro_batches_with_quantized_kv_and_a_grammar(tmp_path: Path, tiny_checkpoints) -> None:
    checkpoint = tiny_checkpoints["llama"]
    extra = SMALL_CHUNKS + "[kv_cache]\nbits = 8\n"
    bodies = [
        {"messages": [{"role": "user", "content": f"Say {i} " * (1 + 5 * i)}], "max_tokens": 24}
        | ({"response_format": {"type": "json_object"}} if i % 2 else {})
        for i in range(4)
    ]

    def answers(url: str) -> list[str]:
        out = [""] * len(bodies)

        def run(i: int) -> None:
            body = {**bodies[i], "temperature": 0}
            response = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
            assert response.status_code == 200, response.text
            out[i] = response.json()["choices"][0]["message"]["content"]

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(bodies))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        return out

    config = write_config(
        tmp_path,
        f'[registry]\ndefault_model = "m"\ncache_dir = "{tmp_path}/c"\n'
        f'[models.m]\nsource = "{checkpoint}"\n{extra}',
    )
    with running_server(config) as server:
        expected = answers(server.url)
    assert expected[1].startswith("{") and expected[3].startswith("{")  # the grammar held
    text = two_ranks_config(tmp_path, checkpoint, 'strategy = "pipeline"\n') + extra
    with launched(tmp_path, text) as (url, _):
        assert answers(url) == expected
        assert metric(url, "mlxserve_overlapped_steps_total") > 0


@pytest.mark.parametrize("family", ["llama", "qwen"])
def test_tensor_parallel_equals_one_rank(family: str, tmp_path: Path, tiny_checkpoints) -> None:
    expected = single_rank_texts(tmp_path, tiny_checkpoints[family])
    text = two_ranks_config(tmp_path, tiny_checkpoints[family], 'strategy = "tensor"\n')
    with launched(tmp_path, text) as (url, _):
        assert httpx.get(url + "/health").json()["placement"]["m"]["strategy"] == "tensor"
        assert [completion(url, p) for p in PROMPTS] == expected


def test_tensor_parallel_streams_each_token_as_it_is_sampled(
    tmp_path: Path, tiny_checkpoints
) -> None:
    """Every step takes at least 50 ms (rank 1 sleeps before each), so chunks sent as their
    tokens are sampled arrive about that far apart; tokens held back and sent together arrive
    in bursts, microseconds apart. (A token that ends inside a character sends nothing: fewer
    chunks than tokens.)"""
    text = two_ranks_config(tmp_path, tiny_checkpoints["llama"], 'strategy = "tensor"\n')
    with launched(tmp_path, text, {SLOW_STEP_ENV: "0.05"}) as (url, _):
        body = {"prompt": PROMPTS[0], "max_tokens": 24, "ignore_eos": True, "stream": True}
        arrivals = []
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as stream:
            for line in stream.iter_lines():
                if line.startswith("data: {"):
                    arrivals.append(time.monotonic())
    gaps = sorted(b - a for a, b in zip(arrivals, arrivals[1:], strict=False))
    assert len(arrivals) >= 12 and gaps[len(gaps) // 2] > 0.04, gaps
    together = [gap for gap in gaps if gap < 0.01]
    assert len(together) <= len(gaps) // 5, f"{len(together)} of {len(gaps)} in bursts: {gaps}"


# Today's types whose mlx-lm model has a tensor-parallel rule (shard), one per cache kind.
TENSOR_TYPES = ["qwen3_5", "deepseek_v32", "ministral3", "gpt_oss"]


@pytest.mark.parametrize("model_type", TENSOR_TYPES)
def test_tensor_parallel_of_todays_types_equals_one_rank(
    model_type: str, tmp_path: Path, today_checkpoints
) -> None:
    expected = single_rank_texts(tmp_path, today_checkpoints[model_type])
    text = two_ranks_config(tmp_path, today_checkpoints[model_type], 'strategy = "tensor"\n')
    with launched(tmp_path, text) as (url, _):
        assert httpx.get(url + "/health").json()["placement"]["m"]["strategy"] == "tensor"
        assert [completion(url, p) for p in PROMPTS] == expected


def test_auto_never_picks_tensor_parallel_without_a_rule(tmp_path: Path, today_checkpoints) -> None:
    """Qwen3-Next has no shard rule in mlx-lm: "auto" cuts it into pipeline stages."""
    checkpoint = today_checkpoints["qwen3_next"]
    text = two_ranks_config(tmp_path, checkpoint, 'strategy = "auto"\n')
    with launched(tmp_path, text) as (url, _):
        assert httpx.get(url + "/health").json()["placement"]["m"]["strategy"] == "pipeline"


# Prompts to score with echo: over several 16-token chunks, and short ones batched together.
SCORED = [list(range(10, 80)), [7, 3, 99, 14], list(range(300, 345)), [11] * 12]


def echo_logprobs(url: str, prompts: list[list[int]]) -> list[dict[str, Any]]:
    """Each prompt scored (echo, logprobs 3, two greedy tokens after it), all at once."""

    def one(prompt: list[int]) -> dict[str, Any]:
        body = {"prompt": prompt, "echo": True, "logprobs": 3, "max_tokens": 2}
        body |= {"temperature": 0, "ignore_eos": True}
        response = httpx.post(url + "/v1/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["logprobs"]

    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, prompts))


@pytest.mark.parametrize(
    ("strategy", "model"),
    [("pipeline", "llama"), ("pipeline", "qwen3_next"), ("tensor", "qwen")],
)
def test_echo_logprobs_on_two_ranks_equal_one(
    strategy: str, model: str, tmp_path: Path, tiny_checkpoints, today_checkpoints
) -> None:
    """The prompt's log probabilities are computed where the logits are, on rank 0 (the last
    pipeline stage; every rank, with tensor parallelism): the same as on one rank."""
    checkpoint = {**tiny_checkpoints, **today_checkpoints}[model]
    config = write_config(
        tmp_path,
        f'[registry]\ndefault_model = "m"\ncache_dir = "{tmp_path}/c"\n'
        f'[models.m]\nsource = "{checkpoint}"\n{SMALL_CHUNKS}',
    )
    with running_server(config) as server:
        expected = [echo_logprobs(server.url, [p])[0] for p in SCORED]
    text = two_ranks_config(tmp_path, checkpoint, f'strategy = "{strategy}"\n') + SMALL_CHUNKS
    with launched(tmp_path, text) as (url, _):
        assert httpx.get(url + "/health").json()["placement"]["m"]["strategy"] == strategy
        for _ in range(2):  # the second time, the prompts' blocks are cached: still recomputed
            for mine, theirs in zip(echo_logprobs(url, SCORED), expected, strict=True):
                assert mine["tokens"] == theirs["tokens"]
                assert mine["text_offset"] == theirs["text_offset"]
                assert mine["token_logprobs"][0] is None
                assert mine["token_logprobs"][1:] == pytest.approx(
                    theirs["token_logprobs"][1:], abs=1e-4
                )
                tops = zip(mine["top_logprobs"][1:], theirs["top_logprobs"][1:], strict=True)
                for top, their_top in tops:
                    assert top == pytest.approx(their_top, abs=1e-4)


def test_unequal_memory_gives_an_uneven_split(tmp_path: Path, tiny_checkpoints) -> None:
    text = two_ranks_config(
        tmp_path, tiny_checkpoints["llama"], 'split = "memory"\nmemory_limit_mb = [3, 1]\n'
    )
    with launched(tmp_path, text) as (url, process):
        placement = httpx.get(url + "/health").json()["placement"]["m"]
        stages = placement["stages"]
        assert [s["layers"] for s in stages] == [[1, 3], [0, 0]]
        assert stages[0]["bytes"] == 3 * stages[1]["bytes"]
    # strategy "auto" (the default) measured the link: splitting a 4-layer model that reads in
    # microseconds never pays for its all-reduces, so it chose the pipeline and said why.
    assert placement["strategy"] == "pipeline"
    log = process.stdout.read()
    assert 'strategy "auto": pipeline. An all-reduce over this link takes' in log, log[-2000:]


def test_a_killed_rank_is_reported_not_hung_on(tmp_path: Path, tiny_checkpoints) -> None:
    text = two_ranks_config(tmp_path, tiny_checkpoints["llama"], "step_timeout_s = 5\n")
    # Rank 1 steps slowly (60 s for the whole request), so that a loaded machine's late first
    # line never lets the request finish before the kill.
    with launched(tmp_path, text, {SLOW_STEP_ENV: "0.02"}) as (url, process):
        [pid] = rank_pids(1, tmp_path)
        body = {"prompt": [5] * 8, "max_tokens": 3000, "ignore_eos": True, "stream": True}
        started = time.monotonic()
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: {")
            os.kill(pid, signal.SIGKILL)
            rest = [line for line in lines if line]
        assert any('"error"' in line for line in rest), rest[-3:]
        health = httpx.get(url + "/health", timeout=5)
        assert health.status_code == 503 and "rank 1" in health.json()["error"], health.text
        assert time.monotonic() - started < 25
        assert process.wait(30) != 0


def test_a_hung_rank_is_detected_within_the_step_timeout(tmp_path: Path, tiny_checkpoints) -> None:
    text = two_ranks_config(tmp_path, tiny_checkpoints["llama"], "step_timeout_s = 2\n")
    with launched(tmp_path, text) as (url, process):
        [pid] = rank_pids(1, tmp_path)
        os.kill(pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            body = {"prompt": [5] * 8, "max_tokens": 50}
            response = httpx.post(url + "/v1/completions", json=body, timeout=30)
            assert response.status_code >= 500
            assert "did not answer within" in response.json()["error"]["message"]
            assert time.monotonic() - started < 10
            health = httpx.get(url + "/health", timeout=5)
            assert health.status_code == 503 and "rank 1" in health.json()["error"]
            os.kill(pid, signal.SIGCONT)  # a stopped process cannot take mlx.launch's SIGTERM
            assert process.wait(30) != 0
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_slow_rank_is_not_declared_dead(tmp_path: Path, tiny_checkpoints) -> None:
    [expected] = single_rank_texts(tmp_path, tiny_checkpoints["llama"], PROMPTS[:1], 3)
    text = two_ranks_config(tmp_path, tiny_checkpoints["llama"], "step_timeout_s = 2\n")
    with launched(tmp_path, text, {SLOW_STEP_ENV: "3"}) as (url, process):
        started = time.monotonic()
        assert completion(url, PROMPTS[0], max_tokens=3) == expected
        assert time.monotonic() - started > 2 * 3  # rank 1 was slower than the timeout, twice
        assert httpx.get(url + "/health", timeout=5).status_code == 200
        assert process.poll() is None


def test_a_failing_follower_exits_non_zero_with_the_traceback(tmp_path: Path) -> None:
    (tmp_path / "mlxserve.toml").write_text(f'[registry]\ncache_dir = "{tmp_path / "c"}"\n')
    script = f"""
import sys
from mlxserve.core.distributed import ranks
from mlxserve.core.distributed.cluster import Cluster
from mlxserve.core.config.schema import load_config
from mlxserve.core.logs import setup_logging
from mlxserve.server.cli.main import follow_rank_zero

ranks.Link.receive = lambda self: ranks.encode(ranks.Op.RESET, "never-loaded")
setup_logging()
sys.exit(follow_rank_zero(load_config({str(tmp_path / "mlxserve.toml")!r}), Cluster(None, 1, 2)))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLXSERVE_", "MLX_"))}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 1, done.stderr
    assert "rank 1 failed" in done.stderr and "KeyError: 'never-loaded'" in done.stderr


LINK_PROBE = """
import sys
from mlxserve.core.distributed.cluster import Cluster
from mlxserve.core.distributed.ranks import Link
cluster = Cluster.join()
link = Link(cluster)
sizes = [0, 5, 1016, 1017, 40_000]
if cluster.rank == 0:
    for size in sizes:
        link.send(bytes(i % 251 for i in range(size)))
else:
    got = [link.receive() for _ in sizes]
    ok = all(m == bytes(i % 251 for i in range(n)) for m, n in zip(got, sizes))
    open(sys.argv[1], "w").write("whole" if ok else repr([len(m) for m in got]))
cluster.gather(1)  # neither rank leaves while the other still reads
"""


def test_messages_of_any_length_cross_the_ring_whole(tmp_path: Path) -> None:
    """Rank 0 → rank 1 framing over the real ring: empty, under, at and past one frame."""
    script, verdict = tmp_path / "probe.py", tmp_path / "verdict"
    script.write_text(LINK_PROBE)
    stderr = run_on_two_ranks([sys.executable, str(script), str(verdict)])
    assert verdict.exists(), stderr[-2000:]
    assert verdict.read_text() == "whole"
