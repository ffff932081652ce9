"""Serving benchmark: mlx_lm.server (the reference) against mlxserve on the same checkpoint.

Usage:
    python tests/benchmarks/bench_serving.py [--size large|small] [--only reference|mlxserve|both]
        [--max-tokens 64] [--streams 8] [--runs 3] [--openblas [PATH]] [--out FILE.md]
        [--reference-blas openblas|builtin]
        [--workdir ~/.cache/mlxserve/bench]

It writes (once, cached under --workdir) a random-weight float32 Llama checkpoint with the
project's own writer (~250M parameters, or ~20M with --size small), then starts each server in
turn on 127.0.0.1 (never both at once), and measures with streaming, greedy
POST /v1/chat/completions:

- single-stream decode tokens/s: (tokens - 1) / (time from first token to last), median of --runs;
- aggregate tokens/s with --streams concurrent requests: total tokens / wall time, median of --runs;
- time to first token (median), single stream and concurrent.

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
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
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


def count_parameters(checkpoint: Path) -> int:
    with open(checkpoint / "model.safetensors", "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    total = 0
    for name, info in header.items():
        if name != "__metadata__":
            total += prod(info["shape"])
    return total


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


def write_mlxserve_config(workdir: Path, checkpoint: Path, streams: int) -> Path:
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
        f"max_batch_size = {max(8, streams)}\n",
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
def running_server(
    command: list[str], port: int, log: Path, env: dict[str, str], timeout: float
) -> Iterator[str]:
    base_url = f"http://{HOST}:{port}/v1"
    print(f"starting: {' '.join(command)}  (log: {log})", flush=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        wait_ready(proc, base_url, log, timeout)
        yield base_url
    finally:
        stop_process(proc)


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
    counter: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def body(self) -> dict[str, Any]:
        with self.lock:
            self.counter += 1
            n = self.counter
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": f"Request {n}. {PROMPT}"}],
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": 0,
            "max_tokens": self.max_tokens,
        }
        if self.logit_bias:
            body["logit_bias"] = self.logit_bias
        return body

    def complete(self) -> Completion:
        start = time.perf_counter()
        first = last = None
        deltas = 0
        usage_tokens = None
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
                if (event.get("usage") or {}).get("completion_tokens") is not None:
                    usage_tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        deltas += 1
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
    )


def bench_server(
    kind: str, args: argparse.Namespace, checkpoint: Path, env: dict[str, str]
) -> Measurement:
    port = free_port()
    command = server_command(kind, checkpoint, args.workdir, port, args.streams)
    log = args.workdir / f"{kind}.log"
    print(f"\n== {LABELS[kind]} ==", flush=True)
    with running_server(command, port, log, env, args.ready_timeout) as base_url:
        client = Client(
            base_url=base_url,
            model="default_model" if kind == "reference" else "bench",
            max_tokens=args.max_tokens,
            timeout=args.request_timeout,
            logit_bias={str(t): -100.0 for t in eos_token_ids(checkpoint)},
        )
        result = measure(client, args.runs, args.streams)
    print(f"  {LABELS[kind]}: {result.requests} requests in {result.seconds:.0f} s", flush=True)
    return result


# ---- report ----------------------------------------------------------------------------


def fmt(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def ratio(new: float | None, ref: float | None) -> str:
    return "-" if new is None or not ref else f"{new / ref:.2f}x"


def machine_info(args: argparse.Namespace, params: int, blas: str) -> list[str]:
    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    return [
        f"- machine: {platform.system()} {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        f"- mlx {version('mlx')}, mlx-lm {version('mlx-lm')}, mlxserve {version('mlxserve')}",
        f"- BLAS: {blas}",
        f"- model: random-weight Llama ({args.size}), {params / 1e6:.1f}M parameters, float32",
        f"- requests: streaming chat, temperature 0, max_tokens {args.max_tokens}, EOS suppressed "
        f"with logit_bias; {args.runs} runs; {args.streams} concurrent streams",
    ]


def report(
    results: dict[str, Measurement],
    failed: list[str],
    args: argparse.Namespace,
    params: int,
    blas: str,
) -> str:
    ref, new = results.get("reference"), results.get("mlxserve")
    rows: list[tuple[str, str, float, int]] = [
        ("decode tok/s, 1 stream (higher is better)", "decode_tps", 1.0, 1),
        (f"aggregate tok/s, {args.streams} streams (higher is better)", "aggregate_tps", 1.0, 1),
        ("TTFT ms, 1 stream (lower is better)", "ttft_single", 1000.0, 0),
        (f"TTFT ms, {args.streams} streams (lower is better)", "ttft_concurrent", 1000.0, 0),
    ]
    lines = [
        "| metric | mlx_lm.server | mlxserve | ratio (mlxserve / reference) |",
        "|---|---:|---:|---:|",
    ]
    for name, attr, scale, digits in rows:
        a = getattr(ref, attr) if ref else None
        b = getattr(new, attr) if new else None
        lines.append(
            f"| {name} | {fmt(a, scale, digits)} | {fmt(b, scale, digits)} | {ratio(b, a)} |"
        )
    for name, attr in (("tokens counted from", "tokens_from"), ("early stops", "early_stops")):
        a = getattr(ref, attr) if ref else "-"
        b = getattr(new, attr) if new else "-"
        lines.append(f"| {name} | {a} | {b} | |")
    status = [
        "failed" if kind in failed else ("-" if kind not in results else "ok") for kind in SERVERS
    ]
    lines.append(f"| run | {status[0]} | {status[1]} | |")
    return "\n".join(["## Serving benchmark", "", *machine_info(args, params, blas), "", *lines])


# ---- main ------------------------------------------------------------------------------


def common_parser(
    description: str, ready_timeout: float = 120.0, max_tokens: int = 64, streams: bool = True
) -> argparse.ArgumentParser:
    """The options every benchmark script shares."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--size", choices=sorted(SIZES), default="large")
    parser.add_argument("--max-tokens", type=int, default=max_tokens)
    if streams:
        parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("~/.cache/mlxserve/bench"))
    parser.add_argument("--out", type=Path, help="also write the report as Markdown here")
    parser.add_argument(
        "--openblas",
        nargs="?",
        const="auto",
        metavar="PATH",
        help="LD_PRELOAD a system OpenBLAS into every server (default path: searched)",
    )
    parser.add_argument("--ready-timeout", type=float, default=ready_timeout)
    parser.add_argument("--request-timeout", type=float, default=900.0)
    return parser


def checked_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    args.workdir = args.workdir.expanduser().resolve()
    if args.max_tokens < 1 or getattr(args, "streams", 1) < 1 or args.runs < 1:
        parser.error("--max-tokens, --streams and --runs must be >= 1")
    return args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common_parser(__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("reference", "mlxserve", "both"), default="both")
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


def mlxserve_blas(log: Path) -> str:
    """What mlxserve's own log says about its BLAS."""
    with contextlib.suppress(OSError):
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            if "BLAS" in line:
                return line.split(": ", 1)[-1].strip()
    return "see its log"


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
    kinds = SERVERS if args.only == "both" else (args.only,)
    results: dict[str, Measurement] = {}
    failed: list[str] = []
    for kind in kinds:
        try:
            results[kind] = bench_server(kind, args, checkpoint, envs[kind])
        except (RuntimeError, httpx.HTTPError) as exc:
            print(f"  error: {LABELS[kind]} failed: {exc}", file=sys.stderr, flush=True)
            failed.append(kind)
    if not args.openblas:
        own_blas = f"as installed: {mlxserve_blas(args.workdir / 'mlxserve.log')}"
    blas = f"reference: {ref_blas}; mlxserve: {own_blas}"
    publish(report(results, failed, args, params, blas), args.out)
    return 1 if failed else 0


def publish(text: str, out: Path | None) -> None:
    """Print the report, and write it as Markdown to ``out`` if given."""
    print("\n" + text)
    if out:
        out.write_text(text + "\n", encoding="utf-8")
        print(f"\nwritten to {out}")


if __name__ == "__main__":
    sys.exit(main())
