"""A soak: a real ``mlxserve serve`` process under a minute of mixed traffic, its memory and
file descriptors sampled every second.

``CLIENTS`` threads send, for ``DURATION`` seconds, a random mix of: streams through the openai
SDK, constrained requests (json_schema, through chat and Responses), clients that disconnect
mid-stream (on every streaming API), oversized bodies (413, with and without Content-Length),
slow readers (a small receive buffer, read a little at a time), slow uploads (headers and body
trickled), and Anthropic Messages through the anthropic SDK, whole and streamed. The KV budget
is small (``KV_BUDGET_TOKENS``), so the prefix cache fills and evicts to the disk tier, which
fills too: with the default ``auto`` budget the cache would grow, by design, up to the
machine's free memory. Throughout and afterwards:

- no 5xx was seen, by a client or in /metrics, and no admitted request failed in the engine;
- GET /health, asked once a second, always answered within ``HEALTH_S``;
- after the warm-up, RSS grew less than ``RSS_GROWTH_MB`` (and its last ten seconds are within
  ``RSS_DRIFT_MB`` of its first ten), and once the traffic stopped the open file descriptors are
  back within ``FD_SLACK`` of the count before it;
- the disconnected clients' requests were counted as such, and none is left running or waiting;
- the server's log has no traceback and no ERROR line;
- a fixed greedy request answers the same text as at the start.

``SOAK_SECONDS`` sets the duration (e.g. ``SOAK_SECONDS=600`` for a longer run).
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import statistics
import threading
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import anthropic
import httpx
import openai
import psutil
import pytest

from ..support.processes import served

DURATION = float(os.environ.get("SOAK_SECONDS", "60"))
WARMUP = min(20.0, DURATION / 3)  # seconds of traffic before the RSS baseline is taken
CLIENTS = 6
LIMIT = 64 * 2**10  # [server] max_request_bytes
RSS_GROWTH_MB = 150  # after the warm-up, at any time
RSS_DRIFT_MB = 50  # the last ten seconds' mean over the first ten's, after the warm-up
FD_SLACK = 20  # open fds once the traffic stopped, over the count before it
HEALTH_S = 2.0  # the longest GET /health may take, at any time (asked once a second)
TIMEOUT = 60
KV_BUDGET_TOKENS = 4096  # 16 MiB of the tiny model's KV: the traffic fills it in seconds
FIXED = {"model": "m", "prompt": "Once upon a time", "max_tokens": 16, "temperature": 0}
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
MESSAGES = [{"role": "user", "content": "Tell me a story about a fox."}]


@dataclass
class Record:
    """What the clients saw: a count per (kind, outcome), and what went wrong."""

    counts: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def saw(self, kind: str, outcome: object) -> None:
        with self.lock:
            self.counts[(kind, str(outcome))] += 1

    def failed(self, kind: str, what: str) -> None:
        with self.lock:
            self.counts[(kind, "failed")] += 1
            self.failures.append(f"{kind}: {what}")


# --- the traffic -------------------------------------------------------------------------------


class Client:
    """One client thread's connections (closed at the end, so their fds go too)."""

    def __init__(self, url: str, rng: random.Random) -> None:
        self.url, self.rng = url, rng
        self.http = httpx.Client(base_url=url, timeout=TIMEOUT)
        self.openai = openai.OpenAI(
            base_url=url + "/v1", api_key="none", max_retries=0, timeout=TIMEOUT
        )
        self.anthropic = anthropic.Anthropic(
            base_url=url, api_key="none", max_retries=0, timeout=TIMEOUT
        )

    def close(self) -> None:
        self.http.close()
        self.openai.close()
        self.anthropic.close()

    def openai_stream(self) -> str:
        stream = self.openai.chat.completions.create(
            model="m",
            messages=MESSAGES,
            stream=True,
            max_tokens=self.rng.randint(4, 32),
            stream_options={"include_usage": True},
        )
        reasons = [c.choices[0].finish_reason for c in stream if c.choices]
        assert reasons and reasons[-1] in ("stop", "length"), reasons
        return "200"

    def constrained(self) -> str:
        if self.rng.random() < 0.5:
            reply = self.openai.chat.completions.create(
                model="m",
                messages=MESSAGES,
                max_tokens=self.rng.randint(8, 40),
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "person", "schema": SCHEMA},
                },
            )
            text = reply.choices[0].message.content or ""
            if reply.choices[0].finish_reason == "stop":
                json.loads(text)  # finished: it must be the JSON asked for
            return "200"
        response = self.openai.responses.create(
            model="m",
            input="Who are you?",
            max_output_tokens=self.rng.randint(8, 40),
            text={"format": {"type": "json_schema", "name": "person", "schema": SCHEMA}},
        )
        if response.status == "completed":
            json.loads(response.output_text)
        return "200"

    def disconnect(self) -> str:
        path, body = self.rng.choice(
            [
                ("/v1/chat/completions", {"messages": MESSAGES}),
                ("/v1/completions", {"prompt": "Once upon a time"}),
                ("/v1/responses", {"input": "Once upon a time"}),
                ("/v1/messages", {"messages": MESSAGES}),
            ]
        )
        tokens = "max_output_tokens" if path == "/v1/responses" else "max_tokens"
        body = {"model": "m", "stream": True, "ignore_eos": True, tokens: 400, **body}
        with self.http.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                return str(response.status_code)
            lines = response.iter_lines()
            for _ in range(self.rng.randint(1, 6)):
                next(lines)
        return "disconnected"  # closed with generation still running

    def oversized(self) -> str:
        filler = b'{"model": "m", "prompt": "' + b"a" * (LIMIT + 100) + b'"}'
        path = self.rng.choice(["/v1/completions", "/v1/chat/completions", "/v1/messages"])
        headers = {"Content-Type": "application/json"}
        if self.rng.random() < 0.5:
            response = self.http.post(path, content=filler, headers=headers)
        else:  # chunked: no Content-Length, the limit is found while reading

            def chunks() -> Iterator[bytes]:
                for start in range(0, len(filler), 8192):
                    yield filler[start : start + 8192]

            response = self.http.post(path, content=chunks(), headers=headers)
        assert response.status_code == 413, response.text
        return "413"

    def slow_reader(self) -> str:
        """A stream read 256 bytes at a time through a 4 KiB receive buffer, so the server's
        writes back up; gives up after a few seconds."""
        body = json.dumps(
            {"model": "m", "prompt": "Once", "stream": True, "ignore_eos": True, "max_tokens": 150}
        ).encode()
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(TIMEOUT)
            sock.connect(("127.0.0.1", int(self.url.rsplit(":", 1)[1])))
            sock.sendall(_request("/v1/completions", body))
            received, deadline = b"", time.monotonic() + self.rng.uniform(2, 6)
            while time.monotonic() < deadline:
                chunk = sock.recv(256)
                if not chunk:
                    break
                received += chunk
                if b"data: [DONE]" in received:
                    break
                time.sleep(0.05)
        status = received.split(b" ", 2)[1].decode() if received.startswith(b"HTTP/") else "?"
        assert status == "200", received[:300]
        return "200" if b"[DONE]" in received else "gave up"

    def slow_upload(self) -> str:
        """A request whose headers, then body, arrive in pieces over about a second and a
        half (well within [server] header_timeout_s and body_timeout_s)."""
        body = json.dumps({"model": "m", "prompt": "Once upon a time", "max_tokens": 4}).encode()
        request = _request("/v1/completions", body)
        with socket.socket() as sock:
            sock.settimeout(TIMEOUT)
            sock.connect(("127.0.0.1", int(self.url.rsplit(":", 1)[1])))
            head, _, rest = request.partition(b"\r\n\r\n")
            for line in (head + b"\r\n\r\n").splitlines(keepends=True):
                sock.sendall(line)
                time.sleep(0.08)
            step = max(1, len(rest) // 8)
            for start in range(0, len(rest), step):
                time.sleep(0.1)
                sock.sendall(rest[start : start + step])
            response = _read_response(sock)
        status = response.split(b" ", 2)[1].decode()
        assert status == "200", response[:300]
        return status

    def messages(self) -> str:
        if self.rng.random() < 0.5:
            message = self.anthropic.messages.create(
                model="m", max_tokens=self.rng.randint(4, 32), messages=MESSAGES
            )
            assert message.stop_reason in ("end_turn", "max_tokens"), message
            return "200"
        with self.anthropic.messages.stream(
            model="m", max_tokens=self.rng.randint(4, 32), messages=MESSAGES
        ) as stream:
            for _ in stream.text_stream:
                pass
            final = stream.get_final_message()
        assert final.stop_reason in ("end_turn", "max_tokens"), final
        return "200"


def _request(path: str, body: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


def _read_response(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


# kind -> weight
MIX = {
    "openai_stream": 4,
    "constrained": 3,
    "disconnect": 3,
    "oversized": 2,
    "slow_reader": 1,
    "slow_upload": 1,
    "messages": 3,
}


def client_loop(url: str, seed: int, until: float, record: Record) -> None:
    rng = random.Random(seed)
    client = Client(url, rng)
    kinds, weights = list(MIX), list(MIX.values())
    try:
        while time.monotonic() < until:
            kind = rng.choices(kinds, weights)[0]
            try:
                record.saw(kind, getattr(client, kind)())
            except (openai.APIStatusError, anthropic.APIStatusError) as exc:
                record.saw(kind, exc.status_code)
                if exc.status_code >= 500:
                    record.failed(kind, f"{exc.status_code}: {exc.message}")
            except Exception:
                record.failed(kind, traceback.format_exc(limit=3))
    finally:
        client.close()


# --- the server and its numbers ----------------------------------------------------------------


@dataclass
class Sample:
    t: float
    rss_mb: float
    fds: int
    health_s: float  # how long GET /health took


def sample_forever(
    url: str, process: psutil.Process, samples: list[Sample], stop: threading.Event
) -> None:
    start = time.monotonic()
    with httpx.Client(base_url=url, timeout=TIMEOUT) as http:
        while not stop.is_set():
            asked = time.monotonic()
            try:
                healthy = http.get("/health").status_code == 200
            except httpx.HTTPError:
                healthy = False
            took = time.monotonic() - asked if healthy else float("inf")
            try:
                rss, fds = process.memory_info().rss / 2**20, process.num_fds()
            except psutil.Error:
                return
            samples.append(Sample(time.monotonic() - start, rss, fds, took))
            stop.wait(max(0.0, 1.0 - (time.monotonic() - asked)))


def greedy(url: str) -> str:
    response = httpx.post(url + "/v1/completions", json=FIXED, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def metrics(url: str) -> list[tuple[str, str, float]]:
    """/metrics as (name, labels, value) for every sample line."""
    text = httpx.get(url + "/metrics", timeout=TIMEOUT).text
    found = re.findall(r"^(\w+)(?:\{(.*)\})? (\S+)$", text, re.MULTILINE)
    return [(name, labels, float(value)) for name, labels, value in found]


def total(samples: list[tuple[str, str, float]], name: str, label: str = "") -> float:
    return sum(v for n, labels, v in samples if n == name and label in labels)


@pytest.fixture
def server(tmp_path: Path, tiny_checkpoints: dict[str, Path]) -> Iterator[tuple[str, int, Path]]:
    with served(
        tmp_path,
        tiny_checkpoints["llama"],
        f"max_request_bytes = {LIMIT}\nshutdown_grace_s = 3",
        # a KV budget the traffic fills, so the prefix cache evicts (to the disk tier, itself
        # full soon): memory stays bounded by the budget, not by the machine's free memory
        f"[kv_cache]\nbudget = {KV_BUDGET_TOKENS}\nmax_sequence_length = 1024\n"
        f'disk_dir = "{tmp_path / "kv"}"\ndisk_max_gb = 0.02\n',
    ) as running:
        yield running.url, running.process.pid, running.log
        assert running.process.poll() is None, (
            f"the server exited:\n{running.log.read_text()[-3000:]}"
        )


@pytest.mark.slow
def test_soak_mixed_traffic_keeps_memory_and_fds_bounded(server: tuple[str, int, Path]) -> None:
    url, pid, log = server
    process = psutil.Process(pid)
    first = greedy(url)
    time.sleep(1)
    fds_before = process.num_fds()

    record, samples, stop = Record(), [], threading.Event()
    sampler = threading.Thread(
        target=sample_forever, args=(url, process, samples, stop), daemon=True
    )
    sampler.start()
    started = time.monotonic()
    until = started + DURATION
    threads = [
        threading.Thread(target=client_loop, args=(url, seed, until, record), daemon=True)
        for seed in range(CLIENTS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(DURATION + 2 * TIMEOUT)
    assert not any(t.is_alive() for t in threads), "a client is stuck"
    traffic_end = time.monotonic() - started

    settled = time.monotonic() + 20  # keep-alive connections close within uvicorn's 5 s
    while process.num_fds() > fds_before + FD_SLACK and time.monotonic() < settled:
        time.sleep(0.5)
    fds_after = process.num_fds()
    stop.set()
    sampler.join(5)
    last = greedy(url)

    summary = "\n".join(
        [f"{kind:>14} {outcome:>12}: {n}" for (kind, outcome), n in sorted(record.counts.items())]
        + [
            f"t={s.t:5.1f}s rss={s.rss_mb:7.1f} MB fds={s.fds} health={s.health_s:.3f}s"
            for s in samples
        ]
    )
    print(summary)
    assert not record.failures, "\n".join(record.failures[:10]) + "\n" + summary
    for kind in MIX:
        assert any(k == kind for k, _ in record.counts), f"no {kind} traffic ran"

    during = [s for s in samples if WARMUP <= s.t <= traffic_end]
    assert len(during) >= 10, summary
    baseline = during[0].rss_mb
    peak = max(s.rss_mb for s in during)
    assert peak - baseline < RSS_GROWTH_MB, f"RSS grew {peak - baseline:.0f} MB\n{summary}"
    head = statistics.mean(s.rss_mb for s in during[:10])
    tail = statistics.mean(s.rss_mb for s in during[-10:])
    assert tail - head < RSS_DRIFT_MB, f"RSS drifted {tail - head:.0f} MB\n{summary}"
    slowest = max(s.health_s for s in samples)
    assert slowest < HEALTH_S, f"/health took {slowest:.1f} s\n{summary}"
    assert fds_after <= fds_before + FD_SLACK, f"fds {fds_before} -> {fds_after}\n{summary}"

    counted = metrics(url)
    failed = [
        f"{name}{{{labels}}} {value:g}"
        for name, labels, value in counted
        if value
        and (
            (name == "mlxserve_http_errors_total" and re.search(r'status="5', labels))
            or (name == "mlxserve_request_errors_total" and "generation_failed" in labels)
        )
    ]
    assert not failed, failed
    # the disconnected clients' requests were aborted, and nothing is left in the engine
    assert total(counted, "mlxserve_request_errors_total", 'kind="client_disconnected"') > 0
    assert total(counted, "mlxserve_requests_running") == 0
    assert total(counted, "mlxserve_requests_waiting") == 0

    text = log.read_text()
    assert "Traceback" not in text, text[text.index("Traceback") - 500 :][:4000]
    errors = [line for line in text.splitlines() if " ERROR " in line]
    assert not errors, "\n".join(errors[:20])
    assert last == first
