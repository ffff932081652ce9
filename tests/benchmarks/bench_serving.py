"""Serving benchmark: mlx_lm.server (the reference) against mlxserve on the same checkpoint.

Usage:
    python tests/benchmarks/bench_serving.py [--size large|small|deep-tiny]
        [--only reference|mlxserve|both]
        [--dtypes float32,bfloat16,4bit] [--max-tokens 64] [--streams 8] [--runs 3]
        [--openblas [PATH]] [--out FILE.md] [--reference-blas openblas|builtin]
        [--workdir ~/.cache/mlxserve/bench]

It writes (once, cached under --workdir) a random-weight float32 Llama checkpoint with the
project's own writer, which builds mlx-lm's model classes (~250M parameters, ~20M with --size
small, or with --size deep-tiny 30 layers of hidden size 128, where a server's per-layer overhead
counts more than its matmuls), and for each of --dtypes other than float32 a copy made by
mlx-lm's own conversion (mlx_lm.convert: bfloat16, or 4-bit with group size 64) next to it.
It then starts one server at a time on 127.0.0.1: the reference on the float32 checkpoint, and
mlxserve once per dtype. It measures with streaming, greedy
POST /v1/chat/completions:

- single-stream decode tokens/s: (tokens - 1) / (time from first token to last), median of --runs;
- aggregate tokens/s with --streams concurrent requests: total tokens / wall time, median of --runs;
- time to first token (median), single stream and concurrent;
- batch scaling: aggregate tokens/s at --streams / the same column's single-stream decode;
- for mlxserve, the dtype it computes in (from its log) and the fraction of the memory-bandwidth
  roofline its single-stream decode reaches: decode tokens/s x weight bytes read per decode step
  (every parameter but the input embedding, at the bytes of that compute dtype) / the float32
  matrix-vector bandwidth of mlxserve's BLAS, measured in a subprocess before the servers start.

The report has one column per server and checkpoint, and one ratio column per mlxserve column
over the reference on float32.

Tokens are counted from the usage chunk (stream_options.include_usage) when the server sends one,
else as the number of SSE content deltas. EOS is suppressed with logit_bias so that every request
runs to max_tokens; a server that rejects logit_bias is retried without it, and a warning is
printed when a completion stops early.

BLAS: mlxserve runs as the README installs it (its own loader puts mkl, or a system OpenBLAS,
under MLX); the reference gets a system OpenBLAS preloaded (LD_PRELOAD), the best a
knowledgeable user gets from mlx_lm.server on a Linux CPU (--reference-blas builtin: MLX's own).
--openblas preloads OpenBLAS into mlxserve too (the old like-for-like comparison).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx

HOST = "127.0.0.1"
SIZES: dict[str, dict[str, Any]] = {
    "large": {
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "num_hidden_layers": 20,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
    },
    "small": {
        "hidden_size": 512,
        "intermediate_size": 1408,
        "num_hidden_layers": 6,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
    },
    # many small layers: the per-layer cost of the engine, not the BLAS, sets the pace
    "deep-tiny": {
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 30,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
    },
}
OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)
PROMPT = (
    "Tell me a story about a robot who learned to paint the sea at night. "
    "Keep it short and friendly."
)
SERVERS = ("reference", "mlxserve")
LABELS = {"reference": "mlx_lm.server", "mlxserve": "mlxserve"}
DTYPES = ("float32", "bfloat16", "4bit")
DTYPE_LABELS = {"float32": "float32", "bfloat16": "bfloat16", "4bit": "4-bit"}
CONVERSIONS: dict[str, dict[str, Any]] = {
    "bfloat16": {"dtype": "bfloat16"},
    "4bit": {"quantize": True, "q_bits": 4, "q_group_size": 64},
}
CONVERT_SCRIPT = "import json, sys, mlx_lm; mlx_lm.convert(**json.loads(sys.argv[1]))"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)
SAFETENSORS_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4,
    "F16": 2, "BF16": 2, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1,
}  # fmt: skip
# matrices, rows, columns: 256 MiB of float32 weights, so that no cache holds them
MATVEC_SHAPE = (16, 4096, 1024)
MATVEC_REPEATS = 30
# prepare_mlx first: it loads mlxserve's BLAS before MLX is imported.
# The best of two ways to read the weights: the BLAS alone, and split as mlxserve runs its
# linear layers (parallel_linear.py), so that the roofline is never a slow path's.
MATVEC_SCRIPT = """
import statistics, sys, time
from mlxserve.core.cpu.startup import prepare_mlx
prepare_mlx()
import mlx.core as mx
import mlx.nn as nn
from mlxserve.core.cpu.blas import cpu_split
from mlxserve.core.cpu.parallel_linear import parallelize_linears

count, rows, cols, repeats = map(int, sys.argv[1:])
model = nn.Sequential(*[nn.Linear(cols, rows, bias=False) for _ in range(count)])
mx.eval(model.parameters())
x = mx.random.normal((1, cols))

def rate():
    def once():
        start = time.perf_counter()
        mx.eval([layer(x) for layer in model.layers])
        return time.perf_counter() - start
    once()
    return count * rows * cols * 4 / statistics.median(once() for _ in range(repeats))

plain = rate()
parallelize_linears(model, cpu_split())
print(max(plain, rate()))
"""
UNKNOWN = "see its log"


# ---- checkpoint ------------------------------------------------------------------------


def checkpoint_dir(workdir: Path, size: str) -> Path:
    digest = hashlib.sha256(json.dumps(SIZES[size], sort_keys=True).encode()).hexdigest()[:8]
    return workdir / f"llama-{size}-{digest}"


def ensure_checkpoint(workdir: Path, size: str) -> Path:
    dest = checkpoint_dir(workdir, size)
    if (dest / "config.json").exists():
        return dest
    from mlxserve.plugins.tiny import write_tiny_checkpoint
    from mlxserve.registry.plugins import load_plugins

    print(f"writing the {size} checkpoint to {dest} ...", flush=True)
    start = time.perf_counter()
    family = load_plugins().family("llama")
    write_tiny_checkpoint(family, dest, overrides=SIZES[size])
    print(f"  done in {time.perf_counter() - start:.1f} s", flush=True)
    return dest


def copy_dir(checkpoint: Path, dtype: str) -> Path:
    return checkpoint.with_name(f"{checkpoint.name}-{dtype}")


def ensure_copy(checkpoint: Path, dtype: str) -> Path:
    """The ``dtype`` copy of the float32 ``checkpoint``, written once by mlx_lm.convert."""
    dest = copy_dir(checkpoint, dtype)
    if (dest / "config.json").exists():
        return dest
    partial = dest.with_name(f"{dest.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    print(f"converting the checkpoint to {dtype}: {dest} ...", flush=True)
    options = {"hf_path": str(checkpoint), "mlx_path": str(partial), **CONVERSIONS[dtype]}
    subprocess.run([sys.executable, "-c", CONVERT_SCRIPT, json.dumps(options)], check=True)
    # Only what the conversion did not write itself: its own files match its tokenizer version.
    for name in TOKENIZER_FILES:
        if (checkpoint / name).exists() and not (partial / name).exists():
            shutil.copy2(checkpoint / name, partial / name)
    partial.rename(dest)
    return dest


def tensors(checkpoint: Path) -> dict[str, dict[str, Any]]:
    """The safetensors headers of ``checkpoint``: name -> {"dtype", "shape", ...}."""
    header: dict[str, dict[str, Any]] = {}
    for path in sorted(checkpoint.glob("*.safetensors")):
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header.update(json.loads(f.read(length)))
    header.pop("__metadata__", None)
    return header


def count_parameters(checkpoint: Path) -> int:
    return sum(prod(info["shape"]) for info in tensors(checkpoint).values())


def decode_step_bytes(checkpoint: Path) -> int:
    """Weight bytes one decode step reads, as stored: every tensor but the input embedding
    (a step gathers one row of it), unless there is no lm_head and the embedding is it."""
    header = tensors(checkpoint)
    tied = not any(name.startswith("lm_head.") for name in header)
    return sum(
        prod(info["shape"]) * SAFETENSORS_BYTES[info["dtype"]]
        for name, info in header.items()
        if tied or "embed_tokens." not in name
    )


def prod(values: list[int]) -> int:
    result = 1
    for value in values:
        result *= value
    return result


def eos_token_ids(checkpoint: Path) -> list[int]:
    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    eos = config.get("eos_token_id", [])
    return eos if isinstance(eos, list) else [eos]


# ---- servers ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def find_openblas(path: str) -> str:
    if path != "auto":
        if not Path(path).exists():
            sys.exit(f"--openblas: {path} does not exist")
        return path
    for candidate in OPENBLAS_CANDIDATES:
        if Path(candidate).exists():
            return candidate
    sys.exit("--openblas: no system OpenBLAS found (try: apt-get install libopenblas0-pthread)")


def mlxserve_executable() -> str:
    beside = Path(sys.executable).parent / "mlxserve"
    return str(beside) if beside.exists() else "mlxserve"


def write_mlxserve_config(workdir: Path, checkpoint: Path, streams: int, extra: str = "") -> Path:
    """mlxserve's config serving ``checkpoint`` (a folder or a .gguf) as model "bench";
    ``extra`` is appended (more TOML tables)."""
    path = workdir / "mlxserve-bench.toml"
    path.write_text(
        "[server]\n"
        f'host = "{HOST}"\n'
        "[registry]\n"
        'default_model = "bench"\n'
        f'cache_dir = "{workdir / "cache"}"\n'
        "[models.bench]\n"
        f'source = "{checkpoint}"\n'
        "[performance]\n"
        f"max_batch_size = {max(8, streams)}\n" + extra,
        encoding="utf-8",
    )
    return path


def server_command(
    kind: str, checkpoint: Path, workdir: Path, port: int, streams: int
) -> list[str]:
    if kind == "reference":
        return [
            sys.executable, "-m", "mlx_lm", "server",
            "--model", str(checkpoint), "--host", HOST, "--port", str(port),
            "--temp", "0.0", "--log-level", "WARNING",
        ]  # fmt: skip
    config = write_mlxserve_config(workdir, checkpoint, streams)
    return [mlxserve_executable(), "--config", str(config), "serve", "--port", str(port)]


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def log_tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_ready(
    proc: subprocess.Popen[bytes], url: str, log: Path, timeout: float, path: str = "/models"
) -> None:
    """Poll ``url + path`` until it answers 200 (bounded by ``timeout``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_tail(log)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}{path}", timeout=2.0).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"server not ready after {timeout:.0f} s:\n{log_tail(log)}")


@contextlib.contextmanager
def started_server(
    command: list[str], port: int, log: Path, env: dict[str, str], timeout: float
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Start ``command`` in its own session, logging to ``log``; yield its /v1 URL once it
    answers, and its process; end its process group after."""
    base_url = f"http://{HOST}:{port}/v1"
    print(f"starting: {' '.join(command)}  (log: {log})", flush=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        wait_ready(proc, base_url, log, timeout)
        yield base_url, proc
    finally:
        stop_process(proc)


@contextlib.contextmanager
def running_server(
    command: list[str], port: int, log: Path, env: dict[str, str], timeout: float
) -> Iterator[str]:
    with started_server(command, port, log, env, timeout) as (base_url, _):
        yield base_url


# ---- requests --------------------------------------------------------------------------


@dataclass
class Completion:
    ttft: float
    elapsed: float
    decode_time: float
    tokens: int
    deltas: int
    from_usage: bool
    finish_reason: str | None
    prompt_tokens: int | None = None
    # when each content chunk arrived, in seconds from sending the request
    arrivals: list[float] = field(default_factory=list)

    @property
    def decode_rate(self) -> float | None:
        if self.tokens < 2 or self.decode_time <= 0:
            return None
        return (self.tokens - 1) / self.decode_time


@dataclass
class Client:
    base_url: str
    model: str
    max_tokens: int
    timeout: float
    logit_bias: dict[str, float] = field(default_factory=dict)
    prompt: str = PROMPT
    # more request fields, e.g. {"ignore_eos": True}
    extra: dict[str, Any] = field(default_factory=dict)
    counter: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def body(self) -> dict[str, Any]:
        with self.lock:
            self.counter += 1
            n = self.counter
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": f"Request {n}. {self.prompt}"}],
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": 0,
            "max_tokens": self.max_tokens,
        }
        if self.logit_bias:
            body["logit_bias"] = self.logit_bias
        return {**body, **self.extra}

    def complete(self) -> Completion:
        start = time.perf_counter()
        first = last = None
        deltas = 0
        arrivals: list[float] = []
        usage_tokens = prompt_tokens = None
        finish_reason = None
        url = f"{self.base_url}/chat/completions"
        with httpx.stream("POST", url, json=self.body(), timeout=self.timeout) as response:
            if response.status_code != 200:
                response.read()
                raise RequestError(response.status_code, response.text)
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                now = time.perf_counter()
                usage = event.get("usage") or {}
                if usage.get("completion_tokens") is not None:
                    usage_tokens = usage["completion_tokens"]
                    prompt_tokens = usage.get("prompt_tokens")
                for choice in event.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        deltas += 1
                        arrivals.append(now - start)
                        first = first or now
                        last = now
                    if choice.get("finish_reason"):
                        finish_reason = choice["finish_reason"]
                        last = now if first else last
        end = time.perf_counter()
        first = first or end
        return Completion(
            ttft=first - start,
            elapsed=end - start,
            decode_time=(last or end) - first,
            tokens=usage_tokens if usage_tokens is not None else deltas,
            deltas=deltas,
            from_usage=usage_tokens is not None,
            finish_reason=finish_reason,
            prompt_tokens=prompt_tokens,
            arrivals=arrivals,
        )


class RequestError(RuntimeError):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"HTTP {status}: {text[:300]}")
        self.status = status


def warm_up(client: Client) -> Completion:
    try:
        return client.complete()
    except RequestError as exc:
        if not client.logit_bias or exc.status not in (400, 422):
            raise
        print(f"  warning: logit_bias rejected ({exc}); retrying without it", flush=True)
        client.logit_bias = {}
        return client.complete()


def concurrent(client: Client, streams: int) -> tuple[list[Completion], float]:
    results: list[Completion | BaseException] = [RuntimeError("not run")] * streams
    barrier = threading.Barrier(streams)

    def work(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            results[i] = client.complete()
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(streams)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=client.timeout + 60)
    wall = time.perf_counter() - start
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise RuntimeError(f"{len(errors)}/{streams} concurrent requests failed: {errors[0]}")
    return [r for r in results if isinstance(r, Completion)], wall


# ---- measuring -------------------------------------------------------------------------


@dataclass
class Measurement:
    decode_tps: float | None = None
    aggregate_tps: float | None = None
    ttft_single: float | None = None
    ttft_concurrent: float | None = None
    tokens_from: str = "-"
    early_stops: int = 0
    requests: int = 0
    seconds: float = 0.0
    singles: list[Completion] = field(default_factory=list)  # the single-stream requests


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def note_early_stops(label: str, completions: list[Completion], max_tokens: int) -> int:
    early = [c for c in completions if c.tokens < max_tokens]
    for c in early:
        print(
            f"  warning: {label} stopped early: {c.tokens}/{max_tokens} tokens "
            f"(finish_reason={c.finish_reason})",
            flush=True,
        )
    return len(early)


def measure(client: Client, runs: int, streams: int) -> Measurement:
    start = time.perf_counter()
    print("  warm-up ...", flush=True)
    warm_up(client)
    single = []
    for i in range(runs):
        single.append(client.complete())
        c = single[-1]
        print(
            f"  single {i + 1}/{runs}: {c.tokens} tokens, ttft {c.ttft * 1000:.0f} ms, "
            f"decode {fmt(c.decode_rate)} tok/s",
            flush=True,
        )
    batched: list[Completion] = []
    aggregates = []
    for i in range(runs):
        completions, wall = concurrent(client, streams)
        batched += completions
        aggregates.append(sum(c.tokens for c in completions) / wall)
        print(
            f"  {streams} streams {i + 1}/{runs}: {sum(c.tokens for c in completions)} "
            f"tokens in {wall:.1f} s = {aggregates[-1]:.1f} tok/s",
            flush=True,
        )
    everything = single + batched
    return Measurement(
        decode_tps=median([c.decode_rate for c in single]),
        aggregate_tps=median(aggregates),
        ttft_single=median([c.ttft for c in single]),
        ttft_concurrent=median([c.ttft for c in batched]),
        tokens_from="usage" if all(c.from_usage for c in everything) else "SSE deltas",
        early_stops=note_early_stops("a request", everything, client.max_tokens),
        requests=len(everything) + 1,
        seconds=time.perf_counter() - start,
        singles=single,
    )


@dataclass
class Column:
    """One server on one checkpoint: a column of the report."""

    kind: str
    dtype: str
    checkpoint: Path
    log: Path
    selected: bool
    status: str = "-"
    result: Measurement | None = None
    compute: str = "-"
    step_bytes: int | None = None

    @property
    def label(self) -> str:
        return f"{LABELS[self.kind]} {DTYPE_LABELS[self.dtype]}"

    def value(self, attr: str) -> Any:
        return getattr(self.result, attr) if self.result else None


def bench_server(column: Column, args: argparse.Namespace, env: dict[str, str]) -> Measurement:
    port = free_port()
    command = server_command(column.kind, column.checkpoint, args.workdir, port, args.streams)
    print(f"\n== {column.label} ==", flush=True)
    with running_server(command, port, column.log, env, args.ready_timeout) as base_url:
        client = Client(
            base_url=base_url,
            model="default_model" if column.kind == "reference" else "bench",
            max_tokens=args.max_tokens,
            timeout=args.request_timeout,
            logit_bias={str(t): -100.0 for t in eos_token_ids(column.checkpoint)},
        )
        result = measure(client, args.runs, args.streams)
    print(f"  {column.label}: {result.requests} requests in {result.seconds:.0f} s", flush=True)
    return result


def matvec_bandwidth(env: dict[str, str]) -> float | None:
    """Bytes/s of float32 matrix-vector products on mlxserve's BLAS: what bounds decoding."""
    print("\nmeasuring the matvec bandwidth with mlxserve's BLAS ...", flush=True)
    args = [str(n) for n in (*MATVEC_SHAPE, MATVEC_REPEATS)]
    try:
        done = subprocess.run(
            [sys.executable, "-c", MATVEC_SCRIPT, *args],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=600,
        )
        bandwidth = float(done.stdout.split()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError) as exc:
        detail = getattr(exc, "stderr", "") or ""
        print(f"  warning: matvec bandwidth not measured: {exc}\n{detail[-2000:]}", flush=True)
        return None
    print(f"  {bandwidth / 1e9:.1f} GB/s", flush=True)
    return bandwidth


def roofline(column: Column, bandwidth: float | None) -> float | None:
    decode, step = column.value("decode_tps"), column.step_bytes
    if decode is None or step is None or not bandwidth:
        return None
    return float(decode * step / bandwidth)


# ---- report ----------------------------------------------------------------------------


def fmt(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def ratio(new: float | None, ref: float | None) -> str:
    return "-" if new is None or not ref else f"{new / ref:.2f}x"


def version(name: str) -> str:
    """An installed distribution's version, or "not installed"."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_info(args: argparse.Namespace, params: int, blas: str) -> list[str]:
    return [
        f"- machine: {platform.system()} {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        f"- mlx {version('mlx')}, mlx-lm {version('mlx-lm')}, mlxserve {version('mlxserve')}",
        f"- BLAS: {blas}",
        f"- model: random-weight Llama ({args.size}), {params / 1e6:.1f}M parameters, float32",
        f"- requests: streaming chat, temperature 0, max_tokens {args.max_tokens}, EOS suppressed "
        f"with logit_bias; {args.runs} runs; {args.streams} concurrent streams",
    ]


def method_lines(columns: list[Column], bandwidth: float | None) -> list[str]:
    copies = [c.dtype for c in columns if c.selected and c.dtype != "float32"]
    count, rows, cols = MATVEC_SHAPE
    lines: list[str] = []
    if copies:
        group = CONVERSIONS["4bit"]["q_group_size"]
        names = [
            DTYPE_LABELS[d] + (f" (group size {group})" if d == "4bit" else "") for d in copies
        ]
        lines.append(
            "- checkpoints: the reference serves the float32 one; mlxserve also serves "
            f"{', '.join(names)} copies of it made by mlx_lm.convert"
        )
    if any(c.selected and c.kind == "mlxserve" for c in columns):
        lines += [
            f"- matvec bandwidth (mlxserve's BLAS, alone or split over its CPU streams, the "
            f"faster; x @ W.T, x 1x{cols}, {count} float32 W of "
            f"{rows}x{cols}, {count * rows * cols * 4 / 1e6:.0f} MB; median of "
            f"{MATVEC_REPEATS}): {fmt(bandwidth, 1e-9)} GB/s",
            "- roofline fraction: decode tok/s x weight bytes per decode step / that bandwidth; "
            "weight bytes: every parameter but the input embedding, at the bytes of the dtype "
            "mlxserve computes in",
        ]
    return lines


def table_row(name: str, cells: list[str], ratios: list[str]) -> str:
    return "| " + " | ".join([name, *cells, *ratios]) + " |"


def table(columns: list[Column], streams: int, bandwidth: float | None) -> list[str]:
    ref = columns[0]
    ours = [c for c in columns if c.kind == "mlxserve"]
    blank = [""] * len(ours)
    lines = [
        table_row("metric", [c.label for c in columns], [f"{c.label} / reference" for c in ours]),
        "|---" + "|---:" * (len(columns) + len(ours)) + "|",
    ]
    for name, attr, scale, digits in (
        ("decode tok/s, 1 stream (higher is better)", "decode_tps", 1.0, 1),
        (f"aggregate tok/s, {streams} streams (higher is better)", "aggregate_tps", 1.0, 1),
        ("TTFT ms, 1 stream (lower is better)", "ttft_single", 1000.0, 0),
        (f"TTFT ms, {streams} streams (lower is better)", "ttft_concurrent", 1000.0, 0),
    ):
        cells = [fmt(c.value(attr), scale, digits) for c in columns]
        lines.append(table_row(name, cells, [ratio(c.value(attr), ref.value(attr)) for c in ours]))
    derived = {
        f"aggregate at {streams} streams / own single-stream decode": [
            ratio(c.value("aggregate_tps"), c.value("decode_tps")) for c in columns
        ],
        "single-stream decode, fraction of the memory-bandwidth roofline": [
            fmt(roofline(c, bandwidth), digits=2) for c in columns
        ],
        "weight MB read per decode step": [fmt(c.step_bytes, 1e-6) for c in columns],
        "compute dtype (mlxserve's log)": [c.compute for c in columns],
        "tokens counted from": [str(c.value("tokens_from") or "-") for c in columns],
        "early stops": [str(c.value("early_stops") if c.result else "-") for c in columns],
        "run": [c.status for c in columns],
    }
    lines += [table_row(name, cells, blank) for name, cells in derived.items()]
    return lines


def report(
    columns: list[Column],
    args: argparse.Namespace,
    params: int,
    blas: str,
    bandwidth: float | None,
) -> str:
    machine = [*machine_info(args, params, blas), *method_lines(columns, bandwidth)]
    table_lines = table(columns, args.streams, bandwidth)
    return "\n".join(["## Serving benchmark", "", *machine, "", *table_lines])


# ---- main ------------------------------------------------------------------------------


def common_parser(
    description: str,
    ready_timeout: float = 120.0,
    max_tokens: int = 64,
    streams: bool = True,
    rounds: bool = False,
) -> argparse.ArgumentParser:
    """The options every benchmark script shares; ``rounds``: with the round options
    (``--runs`` then counts interleaved rounds)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--size", choices=sorted(SIZES), default="large")
    parser.add_argument("--max-tokens", type=int, default=max_tokens)
    if streams:
        parser.add_argument("--streams", type=int, default=8)
    runs = "interleaved rounds" if rounds else None
    parser.add_argument("--runs", type=int, default=3, help=runs)
    parser.add_argument(
        "--openblas",
        nargs="?",
        const="auto",
        metavar="PATH",
        help="LD_PRELOAD a system OpenBLAS into every server (default path: searched)",
    )
    if rounds:
        add_round_options(parser, ready_timeout)
    else:
        add_place_options(parser, ready_timeout)
    return parser


def add_place_options(parser: argparse.ArgumentParser, ready_timeout: float = 600.0) -> None:
    """Where a benchmark works and writes its report, and how long it waits."""
    parser.add_argument("--workdir", type=Path, default=Path("~/.cache/mlxserve/bench"))
    parser.add_argument("--out", type=Path, help="also write the report as Markdown here")
    parser.add_argument("--ready-timeout", type=float, default=ready_timeout)
    parser.add_argument("--request-timeout", type=float, default=900.0)


def add_round_options(parser: argparse.ArgumentParser, ready_timeout: float = 600.0) -> None:
    """Where interleaved-round benchmarks work and write, and how long they wait."""
    add_place_options(parser, ready_timeout)
    parser.add_argument("--json", type=Path, help="also write every round's figures here")


def checked_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    args.workdir = args.workdir.expanduser().resolve()
    if args.max_tokens < 1 or getattr(args, "streams", 1) < 1 or args.runs < 1:
        parser.error("--max-tokens, --streams and --runs must be >= 1")
    return args


def names(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    """An option's type: a comma-separated list of some of ``choices``, each once."""

    def parse(text: str) -> list[str]:
        picked = list(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
        if not picked or any(x not in choices for x in picked):
            raise argparse.ArgumentTypeError(f"choose from {','.join(choices)}, got {text!r}")
        return picked

    return parse


dtype_list = names(DTYPES)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common_parser(__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("reference", "mlxserve", "both"), default="both")
    parser.add_argument(
        "--dtypes",
        type=dtype_list,
        default=list(DTYPES),
        help=f"checkpoints mlxserve serves, comma-separated from {','.join(DTYPES)} "
        "(the reference always serves float32)",
    )
    parser.add_argument(
        "--reference-blas",
        choices=("openblas", "builtin"),
        default="openblas",
        help="the reference's BLAS: a preloaded system OpenBLAS (default) or MLX's own",
    )
    args = checked_args(parser, argv)
    if args.max_tokens < 2:
        parser.error("--max-tokens must be >= 2 to measure decoding")
    return args


def server_env(openblas: str | None) -> tuple[dict[str, str], str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if not openblas:
        return env, "MLX built-in (no OpenBLAS preloaded)"
    path = find_openblas(openblas)
    env["LD_PRELOAD"] = ":".join(p for p in (path, env.get("LD_PRELOAD")) if p)
    return env, f"OpenBLAS preloaded ({path})"


def reference_env(choice: str) -> tuple[dict[str, str], str]:
    """The reference's environment: a system OpenBLAS preloaded, unless ``builtin``."""
    if choice == "builtin":
        return server_env(None)
    with contextlib.suppress(SystemExit):
        return server_env("auto")
    print("  warning: no system OpenBLAS; the reference runs on MLX's own BLAS", flush=True)
    return server_env(None)


def log_lines(log: Path) -> list[str]:
    with contextlib.suppress(OSError):
        return log.read_text(encoding="utf-8", errors="replace").splitlines()
    return []


def mlxserve_blas(log: Path) -> str:
    """What mlxserve's own log says about its BLAS."""
    for line in log_lines(log):
        if "BLAS" in line:
            return line.split(": ", 1)[-1].strip()
    return UNKNOWN


def mlxserve_compute(log: Path) -> str:
    """The dtype mlxserve's log says the model computes in (core/model/dtype.py's line)."""
    for line in log_lines(log):
        _, found, rest = line.partition("model bench: ")
        if found and rest.startswith("computing in "):
            return rest.removeprefix("computing in ").split(": ", 1)[0].strip()
        if found and rest.startswith("keeping "):
            return rest.split(":", 1)[0].strip()
    return UNKNOWN


def plan_columns(args: argparse.Namespace, checkpoint: Path) -> list[Column]:
    """The reference on float32 first, then mlxserve on each of ``--dtypes``."""
    wanted = SERVERS if args.only == "both" else (args.only,)
    workdir = args.workdir
    columns = [
        Column("reference", "float32", checkpoint, workdir / "reference.log", "reference" in wanted)
    ]
    for dtype in args.dtypes:
        float32 = dtype == "float32"
        columns.append(
            Column(
                kind="mlxserve",
                dtype=dtype,
                checkpoint=checkpoint if float32 else copy_dir(checkpoint, dtype),
                log=workdir / ("mlxserve.log" if float32 else f"mlxserve-{dtype}.log"),
                selected="mlxserve" in wanted,
            )
        )
    return columns


def prepare_copies(columns: list[Column], checkpoint: Path) -> None:
    for column in columns:
        if not column.selected or column.checkpoint == checkpoint:
            continue
        try:
            ensure_copy(checkpoint, column.dtype)
        except (OSError, subprocess.CalledProcessError) as exc:
            print(f"  error: {column.dtype} conversion failed: {exc}", file=sys.stderr, flush=True)
            column.status = "failed"


def run_column(
    column: Column, args: argparse.Namespace, env: dict[str, str], checkpoint: Path
) -> None:
    try:
        column.result = bench_server(column, args, env)
        column.status = "ok"
    except (RuntimeError, httpx.HTTPError) as exc:
        print(f"  error: {column.label} failed: {exc}", file=sys.stderr, flush=True)
        column.status = "failed"
        return
    if column.kind == "mlxserve":
        column.compute = mlxserve_compute(column.log)
        if column.compute.startswith("float32"):
            column.step_bytes = decode_step_bytes(checkpoint)
        elif column.compute != UNKNOWN:
            column.step_bytes = decode_step_bytes(column.checkpoint)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args = parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    own_env, own_blas = server_env(args.openblas)
    ref_env, ref_blas = reference_env(args.reference_blas)
    envs = {"reference": ref_env, "mlxserve": own_env}
    checkpoint = ensure_checkpoint(args.workdir, args.size)
    params = count_parameters(checkpoint)
    print(f"checkpoint: {checkpoint} ({params:,} parameters)", flush=True)
    columns = plan_columns(args, checkpoint)
    prepare_copies(columns, checkpoint)
    ours = [c for c in columns if c.kind == "mlxserve" and c.selected]
    bandwidth = matvec_bandwidth(own_env) if ours else None
    for column in columns:
        if column.selected and column.status == "-":
            run_column(column, args, envs[column.kind], checkpoint)
    if not args.openblas:
        logs = [c.log for c in ours if c.status == "ok"]
        own_blas = f"as installed: {mlxserve_blas(logs[0]) if logs else UNKNOWN}"
    blas = f"reference: {ref_blas}; mlxserve: {own_blas}"
    publish(report(columns, args, params, blas, bandwidth), args.out)
    return 1 if any(c.status == "failed" for c in columns) else 0


def publish(text: str, out: Path | None) -> None:
    """Print the report, and write it as Markdown to ``out`` if given."""
    print("\n" + text)
    if out:
        out.write_text(text + "\n", encoding="utf-8")
        print(f"\nwritten to {out}")


if __name__ == "__main__":
    sys.exit(main())
