"""Distributed benchmark: one rank (`mlxserve serve`) against two pipeline ranks on loopback.

Usage:
    python tests/benchmarks/bench_distributed.py [--size large|small] [--mode shared|pinned|both]
        [--max-tokens 64] [--streams 8] [--runs 3] [--probe-steps 300] [--openblas [PATH]]
        [--out FILE.md] [--workdir ~/.cache/mlxserve/bench]

On the same random-weight float32 Llama checkpoint as bench_serving.py (written once, cached
under --workdir), it starts in turn (never two at once) on 127.0.0.1, in each mode:

- 1 rank: `mlxserve serve`;
- 2 ranks: `mlxserve launch` with `[distributed] hosts = ["127.0.0.1", "127.0.0.1"]`,
  strategy "pipeline", split "even" (mlx.launch, ring backend over loopback).

Modes:

- shared: every process may run on every core, with the BLAS threads (or CPU streams) mlxserve
  picks (the cores, shared among the ranks of one host): both ranks compete for the same cores.
- pinned: the stand-in for two one-core machines. Each rank runs on a core of its own (rank r on
  the r-th core this process may use, by `taskset` in a wrapper script written to --workdir and
  given as `[distributed] python`), the 1-rank baseline on the first core (`taskset -c`), all
  with MLXSERVE_BLAS_THREADS=1. The cores each rank may use (Cpus_allowed_list in /proc) are
  read back and printed; the benchmark's own client and the launchers are not pinned.

Both setups are measured with bench_serving.py's streaming, greedy chat requests (EOS
suppressed): single-stream decode rate, aggregate rate and time to first token with --streams
concurrent streams, side by side with their ratio 2 ranks / 1 rank; the resident memory (VmRSS
after one warm-up request, VmHWM at the end) of every rank; the layers per rank (GET /health)
and the BLAS each rank's log reports. After the measured runs come two more requests, each
between two reads of rank 0's GET /metrics: a batch of --streams, whose share of steps
(mlxserve_steps_total) that overlapped another lane's step in flight
(mlxserve_overlapped_steps_total) shows whether the micro-batches (mlxserve_micro_batches) kept
both ranks busy; and a single stream, whose decode rate as rank 0's engine saw it
(mlxserve_inter_token_latency_seconds) checks the client's figure, which tokens reaching the
client in bursts would skew (a warning says so).

Per-step coordination cost: coordination_probe.py, beside this file, runs on two ranks under
mlx.launch (ring backend, 127.0.0.1, placed as the mode says) and times on rank 0, median of
--probe-steps steps, a round trip to rank 1 that answers with (8, 1, 1024) float32 hidden
states: with the step plan (8 decode rows) sent as now (binary, Link.send), with it sent the old
way (JSON broadcast with two all_sum), and with only the 8 token ids (the baseline). The plan's
cost per step is its round trip minus the baseline's.

What to expect: in shared mode the two ranks share the cores one rank has to itself (with as
many BLAS threads), so no second machine's worth of compute is added: the figures show the
distributed path's cost, and what the micro-batches win back from BLAS threads that scale
poorly. Pinned, each rank has a core of its own and rank 0 keeps one micro-batch per stage in
flight, so at 8 streams both stages work at once and 2 ranks should approach 2x one rank's
aggregate (the goal: >= 1.7x). One stream is one micro-batch whose stages run one after the
other: a pipeline cannot make it faster, only a little slower (goal: >= 0.95x), by the
per-step coordination cost (goal: < 2 ms). Where a gap to 2x can go: rank 0's core also serves
HTTP, samples and detokenizes for every lane; and each lane reads its stage's weights again,
so where a step costs about the same whatever its rows (memory-bound), two lanes of 4 cost
what one batch of 8 does. The "at rank 0's engine" rows leave out prefill and HTTP delivery.
The small model's steps are short, so its figures are dominated by per-step overheads; judge
the goals on --size large, on a quiet machine (a pinned rank cannot move away from other work).

--openblas preloads a system OpenBLAS (LD_PRELOAD) into every process; mlx.launch passes the
environment on to local ranks, and the script checks in /proc/<pid>/maps that each rank really
loaded it (pinned mode then also sets OPENBLAS_NUM_THREADS=1, which a preloaded OpenBLAS reads).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_serving as bs  # noqa: E402

SETUPS = {1: "1 rank (serve)", 2: "2 ranks (pipeline)"}
MODES = ("shared", "pinned")
MODEL = "bench"
PROBE = Path(__file__).resolve().with_name("coordination_probe.py")
PROBE_WAYS = {
    "tokens": "8 token ids (int32): the baseline",
    "binary": "step plan, binary (Link.send): now",
    "json": "step plan, JSON broadcast (2 x all_sum): before",
}
# mlxserve's own launcher: mlx.launch without its busy wait on the ranks' stdin.
LAUNCHER = "from mlxserve.server.cli.launch import LAUNCHER; exec(LAUNCHER)"
WRAPPER = """#!/bin/bash
# [distributed] python of the pinned mode: rank r runs on the r-th of these cores.
cores=({cores})
exec taskset -c "${{cores[$MLX_RANK]}}" {python} "$@"
"""
BLAS_LINE = re.compile(
    r"(?:\[rank (\d+)\] )?mlxserve\.core\.cpu\.blas: BLAS (\S+).*?(\S+) thread\(s\)"
    r"(?:.*split over (\d+) CPU streams)?"
)
ITL = "inter_token_latency_seconds"
SCRAPED = ("steps_total", "overlapped_steps_total", "micro_batches", ITL + "_sum", ITL + "_count")
GOALS = {"aggregate": 1.7, "single": 0.95, "coordination_ms": 2.0}


# ---- modes -------------------------------------------------------------------------------


@dataclass
class Placement:
    """Where one mode's processes run, and their environment."""

    mode: str
    env: dict[str, str]
    cores: tuple[int, ...] = ()  # pinned: rank r on cores[r]
    wrapper: Path | None = None  # pinned: the ranks' [distributed] python

    @property
    def pinned(self) -> bool:
        return self.wrapper is not None

    def expected_cores(self, ranks: int) -> dict[int, str] | None:
        return {r: str(self.cores[r]) for r in range(ranks)} if self.pinned else None


def launch_env(env: dict[str, str]) -> dict[str, str]:
    """The benchmark's environment, without settings that would override the config file."""
    return {k: v for k, v in env.items() if not k.startswith(("MLXSERVE_", "MLX_"))}


def pin_cores(ranks: int = 2) -> tuple[int, ...]:
    if shutil.which("taskset") is None:
        sys.exit("--mode pinned needs taskset (util-linux)")
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < ranks:
        sys.exit(f"--mode pinned needs {ranks} cores; this process may use {cores}")
    return tuple(cores[:ranks])


def write_wrapper(workdir: Path, cores: tuple[int, ...]) -> Path:
    path = workdir / f"pin-ranks-{os.getpid()}.sh"
    text = WRAPPER.format(cores=" ".join(map(str, cores)), python=shlex.quote(sys.executable))
    path.write_text(text, encoding="utf-8")
    path.chmod(0o755)
    return path


def placement(mode: str, args: argparse.Namespace, env: dict[str, str]) -> Placement:
    base = launch_env(env)
    if mode == "shared":
        return Placement(mode, base)
    cores = pin_cores()
    threads = {"MLXSERVE_BLAS_THREADS": "1"}
    if args.openblas:  # preloaded, it is not mlxserve's loader that sets its threads
        threads["OPENBLAS_NUM_THREADS"] = "1"
    return Placement(mode, {**base, **threads}, cores, write_wrapper(args.workdir, cores))


# ---- configuration and processes ---------------------------------------------------------


def write_config(
    args: argparse.Namespace, checkpoint: Path, ranks: int, port: int, place: Placement
) -> Path:
    lines = [
        "[server]",
        f'host = "{bs.HOST}"',
        f"port = {port}",
        "[registry]",
        f'default_model = "{MODEL}"',
        f'cache_dir = "{args.workdir / "cache"}"',
        f"[models.{MODEL}]",
        f'source = "{checkpoint}"',
        "[performance]",
        f"max_batch_size = {max(8, args.streams)}",
    ]
    if ranks > 1:
        hosts = ", ".join([f'"{bs.HOST}"'] * ranks)
        lines += [
            "[distributed]",
            f"hosts = [{hosts}]",
            'strategy = "pipeline"',
            f"split = {args.split}",
            f"starting_port = {bs.free_port()}",
        ]
        if place.wrapper is not None:
            lines.append(f'python = "{place.wrapper}"')
    # Named after this process: concurrent runs sharing --workdir must not meet.
    path = args.workdir / f"mlxserve-distributed-{place.mode}-{ranks}-{os.getpid()}.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def command(config: Path, ranks: int, place: Placement) -> list[str]:
    if ranks > 1:
        return [bs.mlxserve_executable(), "launch", "--config", str(config)]
    pin = ["taskset", "-c", str(place.cores[0])] if place.pinned else []
    return [*pin, bs.mlxserve_executable(), "serve", "--config", str(config)]


def read_proc(pid: int, name: str) -> bytes:
    try:
        return (Path("/proc") / str(pid) / name).read_bytes()
    except OSError:
        return b""


def processes_with(config: Path) -> list[int]:
    """Pids whose command line names ``config``: the launcher, mlx.launch and the ranks."""
    needle = str(config).encode()
    pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    return [pid for pid in pids if pid != os.getpid() and needle in read_proc(pid, "cmdline")]


def rank_pids(config: Path, ranks: int, root: int) -> dict[int, int]:
    """rank -> pid of each rank process started with ``config`` (``root`` when only one)."""
    if ranks == 1:
        return {0: root}
    found: dict[int, int] = {}
    for pid in processes_with(config):
        if b"mlxserve.server.cli.main" not in read_proc(pid, "cmdline"):
            continue
        for entry in read_proc(pid, "environ").split(b"\0"):
            if entry.startswith(b"MLX_RANK="):
                found[int(entry[9:])] = pid
    if sorted(found) != list(range(ranks)):
        raise RuntimeError(f"expected ranks 0-{ranks - 1}, found {found}")
    return found


def kill_leftovers(config: Path) -> None:
    """Processes that outlived the server's process group (mlx.launch runs in its own)."""
    for _ in range(10):
        pids = processes_with(config)
        if not pids:
            return
        time.sleep(1.0)
    for pid in pids:
        print(f"  warning: pid {pid} still running after stop; killing it", flush=True)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def running(
    args: argparse.Namespace, checkpoint: Path, ranks: int, place: Placement, log: Path
) -> Iterator[tuple[str, dict[int, int]]]:
    """Start the server (1 rank) or the launcher (2 ranks); yield its URL and rank pids."""
    port = bs.free_port()
    config = write_config(args, checkpoint, ranks, port, place)
    argv = command(config, ranks, place)
    print(f"starting: {' '.join(argv)}  (log: {log})", flush=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=place.env, start_new_session=True
        )
    try:
        url = f"http://{bs.HOST}:{port}"
        bs.wait_ready(proc, url, log, args.ready_timeout, path="/health")
        yield url, rank_pids(config, ranks, proc.pid)
    finally:
        bs.stop_process(proc)
        kill_leftovers(config)
        config.unlink(missing_ok=True)


# ---- measuring ---------------------------------------------------------------------------


@dataclass
class Memory:
    rss_kb: int
    hwm_kb: int


@dataclass
class Overlap:
    """Rank 0's step counters over one batch of concurrent requests."""

    steps: float
    overlapped: float
    lanes: float | None

    @property
    def share(self) -> float | None:
        return self.overlapped / self.steps if self.steps else None

    def text(self) -> str:
        share = "-" if self.share is None else f"{self.share:.0%}"
        lanes = "?" if self.lanes is None else f"{self.lanes:.0f}"
        return f"{self.overlapped:.0f}/{self.steps:.0f} ({share}), {lanes} lane(s)"


@dataclass
class Result:
    measurement: bs.Measurement
    after_warm_up: dict[int, Memory]
    at_end: dict[int, Memory]
    stages: list[dict[str, Any]]
    openblas: dict[int, bool]
    cores: dict[int, str]
    blas: dict[int, str] = field(default_factory=dict)
    overlap: Overlap | None = None
    engine_decode_tps: float | None = None
    engine_batch_tps: float | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def memory(pid: int) -> Memory:
    values = status_fields(pid, ("VmRSS", "VmHWM"))
    if len(values) != 2:
        raise RuntimeError(f"cannot read the memory of pid {pid} (has it exited?)")
    return Memory(rss_kb=int(values["VmRSS"].split()[0]), hwm_kb=int(values["VmHWM"].split()[0]))


def status_fields(pid: int, keys: tuple[str, ...]) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in read_proc(pid, "status").decode(errors="replace").splitlines():
        key, _, rest = line.partition(":")
        if key in keys:
            values[key] = rest.strip()
    return values


def allowed_cores(pid: int) -> str:
    return status_fields(pid, ("Cpus_allowed_list",)).get("Cpus_allowed_list", "?")


def has_openblas(pid: int) -> bool:
    return b"libopenblas" in read_proc(pid, "maps")


def placement_stages(url: str) -> list[dict[str, Any]]:
    body = httpx.get(f"{url}/health", timeout=10.0).json()
    return (body.get("placement") or {}).get(MODEL, {}).get("stages", [])


def blas_by_rank(log: Path) -> dict[int, str]:
    """What each rank's log says about its BLAS: "name, N thread(s)[, M CPU streams]"."""
    found: dict[int, str] = {}
    for line in bs.log_lines(log):
        match = BLAS_LINE.search(line)
        if match:
            streams = f", {match[4]} CPU streams" if match[4] else ""
            found[int(match[1] or 0)] = f"{match[2]}, {match[3]} thread(s){streams}"
    return found


def metric(text: str, name: str) -> float | None:
    """The value of ``name`` for this benchmark's model in a Prometheus text exposition."""
    for line in text.splitlines():
        if line.startswith(name + "{") and f'model="{MODEL}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return None


def scrape(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10.0).text
    found = {name: metric(text, f"mlxserve_{name}") for name in SCRAPED}
    missing = [name for name, v in found.items() if v is None and name != "micro_batches"]
    if missing:
        raise RuntimeError(f"GET /metrics has no mlxserve_{', mlxserve_'.join(missing)}")
    return {name: v for name, v in found.items() if v is not None}


def per_request_rate(before: dict[str, float], after: dict[str, float]) -> float | None:
    """Tokens/s of each request between two scrapes, from rank 0's inter-token latencies."""
    tokens = after[ITL + "_count"] - before[ITL + "_count"]
    seconds = after[ITL + "_sum"] - before[ITL + "_sum"]
    return tokens / seconds if tokens and seconds > 0 else None


def batch_on_metrics(client: bs.Client, url: str, streams: int) -> tuple[Overlap, float | None]:
    """One more batch of ``streams`` requests: the share of rank 0's steps that overlapped,
    and the batch's decode rate at rank 0's engine (``streams`` x each request's)."""
    before = scrape(url)
    bs.concurrent(client, streams)
    after = scrape(url)
    steps = after["steps_total"] - before["steps_total"]
    overlapped = after["overlapped_steps_total"] - before["overlapped_steps_total"]
    rate = per_request_rate(before, after)
    lanes = after.get("micro_batches")
    return Overlap(steps, overlapped, lanes), None if rate is None else rate * streams


def single_on_metrics(client: bs.Client, url: str, runs: int) -> float | None:
    """``runs`` more single-stream requests: the median decode rate at rank 0's engine."""
    rates = []
    for _ in range(runs):
        before = scrape(url)
        client.complete()
        rates.append(per_request_rate(before, scrape(url)))
    return bs.median(rates)


def check_decode_rate(result: Result) -> None:
    """Tokens reaching the client in bursts make its decode rate too high."""
    client, engine = result.measurement.decode_tps, result.engine_decode_tps
    if client and engine and client > 1.5 * engine:
        result.notes.append(
            f"single-stream decode: {client:.1f} tok/s at the client but {engine:.1f} at rank "
            "0's engine: the tokens reached the client in bursts (a starved event loop?)"
        )


def check_pinning(result: Result, expected: dict[int, str] | None) -> None:
    if expected is not None and result.cores != expected:
        result.notes.append(f"ranks are not pinned as asked: {result.cores}, not {expected}")
    one_thread = [b.endswith(" 1 thread(s)") for b in result.blas.values()]
    if expected is not None and not (one_thread and all(one_thread)):
        result.notes.append(f"not 1 BLAS thread per rank: {result.blas}")


def check_openblas(result: Result, asked: bool) -> None:
    missing = [rank for rank, loaded in result.openblas.items() if not loaded]
    if asked and missing:
        result.notes.append(f"OpenBLAS was NOT loaded by rank(s) {missing}")


def client_for(args: argparse.Namespace, url: str, checkpoint: Path) -> bs.Client:
    return bs.Client(
        base_url=f"{url}/v1",
        model=MODEL,
        max_tokens=args.max_tokens,
        timeout=args.request_timeout,
        logit_bias={str(t): -100.0 for t in bs.eos_token_ids(checkpoint)},
    )


def engine_figures(result: Result, client: bs.Client, url: str, args: argparse.Namespace) -> None:
    """What rank 0's GET /metrics says over a few more requests (see the module docstring)."""
    result.overlap, result.engine_batch_tps = batch_on_metrics(client, url, args.streams)
    result.engine_decode_tps = single_on_metrics(client, url, args.runs)
    print(
        f"  at rank 0's engine: {bs.fmt(result.engine_decode_tps)} tok/s single stream, "
        f"{bs.fmt(result.engine_batch_tps)} tok/s at {args.streams} streams; steps "
        f"overlapped: {result.overlap.text()}",
        flush=True,
    )


def bench_setup(args: argparse.Namespace, checkpoint: Path, ranks: int, place: Placement) -> Result:
    print(f"\n== {place.mode}: {SETUPS[ranks]} ==", flush=True)
    start = time.perf_counter()
    log = args.workdir / f"distributed-{place.mode}-{ranks}-{os.getpid()}.log"
    with running(args, checkpoint, ranks, place, log) as (url, pids):
        client = client_for(args, url, checkpoint)
        print("  loading the model (first request) ...", flush=True)
        bs.warm_up(client)
        after = {rank: memory(pid) for rank, pid in pids.items()}
        openblas = {rank: has_openblas(pid) for rank, pid in pids.items()}
        cores = {rank: allowed_cores(pid) for rank, pid in pids.items()}
        print(f"  allowed cores: {cores}", flush=True)
        stages = placement_stages(url)
        measurement = bs.measure(client, args.runs, args.streams)
        result = Result(measurement, after, {}, stages, openblas, cores, blas_by_rank(log))
        engine_figures(result, client, url, args)
        result.at_end = {rank: memory(pid) for rank, pid in pids.items()}
    result.seconds = time.perf_counter() - start
    check_decode_rate(result)
    check_pinning(result, place.expected_cores(ranks))
    check_openblas(result, bool(args.openblas))
    for note in result.notes:
        print(f"  warning: {note}", flush=True)
    print(f"  {SETUPS[ranks]}: done in {result.seconds:.0f} s", flush=True)
    return result


# ---- the coordination probe ----------------------------------------------------------------


@dataclass
class Probe:
    steps: int
    cores: list[str]
    round_trip_ms: dict[str, float]
    codec_ms: dict[str, float]
    bytes: dict[str, int]

    def cost_ms(self, way: str) -> float:
        return self.round_trip_ms[way] - self.round_trip_ms["tokens"]


def probe_command(args: argparse.Namespace, place: Placement, out: Path) -> list[str]:
    python = str(place.wrapper or sys.executable)
    return [
        sys.executable, "-c", LAUNCHER, "-n", "2", "--backend", "ring",
        "--starting-port", str(bs.free_port()), "--python", python,
        "--", str(PROBE), str(out), "--steps", str(args.probe_steps),
    ]  # fmt: skip


def run_probe(args: argparse.Namespace, place: Placement) -> Probe | None:
    """Run coordination_probe.py on two ranks placed as ``place`` says; None if it failed."""
    print(f"\n== {place.mode}: coordination probe ({args.probe_steps} steps) ==", flush=True)
    out = args.workdir / f"probe-{place.mode}-{os.getpid()}.json"
    log = out.with_suffix(".log")
    out.unlink(missing_ok=True)
    with open(log, "wb") as sink:
        # stdin kept open and empty, as `mlxserve launch` does: at its end mlx.launch spins
        proc = subprocess.Popen(
            probe_command(args, place, out),
            stdin=subprocess.PIPE,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=place.env,
            start_new_session=True,
        )
    try:
        proc.wait(timeout=args.probe_timeout)
    except subprocess.TimeoutExpired:
        print(f"  warning: the probe did not end within {args.probe_timeout:g} s", flush=True)
    finally:
        bs.stop_process(proc)
    if not out.exists():
        print(f"  error: the probe failed:\n{bs.log_tail(log)}", file=sys.stderr, flush=True)
        return None
    probe = Probe(**json.loads(out.read_text(encoding="utf-8")))
    out.unlink()
    print(f"  round trips (ms): {probe.round_trip_ms}; cores {probe.cores}", flush=True)
    return probe


# ---- running a mode ----------------------------------------------------------------------


@dataclass
class ModeRun:
    place: Placement
    results: dict[int, Result] = field(default_factory=dict)
    failed: list[int] = field(default_factory=list)
    probe: Probe | None = None

    @property
    def ok(self) -> bool:
        return not self.failed and self.probe is not None


def run_mode(args: argparse.Namespace, checkpoint: Path, place: Placement) -> ModeRun:
    run = ModeRun(place)
    for ranks in SETUPS:
        try:
            run.results[ranks] = bench_setup(args, checkpoint, ranks, place)
        except (RuntimeError, httpx.HTTPError) as exc:
            print(f"  error: {SETUPS[ranks]} failed: {exc}", file=sys.stderr, flush=True)
            run.failed.append(ranks)
    run.probe = run_probe(args, place)
    return run


# ---- report ------------------------------------------------------------------------------

Row = tuple[str, list[float | None], int]


def mb(kb: int | None) -> float | None:
    return None if kb is None else kb / 1024


def layers_text(result: Result, num_layers: int) -> str:
    if not result.stages:
        return f"all {num_layers} (0-{num_layers - 1})"
    parts = []
    for s in result.stages:
        first, last = s["layers"]
        parts.append(
            f"r{s['rank']}: {first}-{last} ({last - first + 1}, {s['bytes'] / 2**20:.0f} MB)"
        )
    return "; ".join(parts)


def value(results: dict[int, Result], ranks: int, attr: str, scale: float = 1.0) -> float | None:
    """``attr`` of the result of ``ranks``, or of its measurement."""
    result = results.get(ranks)
    if result is None:
        return None
    found = getattr(result if hasattr(result, attr) else result.measurement, attr)
    return None if found is None else found * scale


def per_token_ms(results: dict[int, Result], ranks: int) -> float | None:
    rate = value(results, ranks, "decode_tps")
    return 1000.0 / rate if rate else None


def speed_rows(results: dict[int, Result], streams: int) -> list[Row]:
    def each(attr: str, scale: float = 1.0) -> list[float | None]:
        return [value(results, n, attr, scale) for n in SETUPS]

    return [
        ("decode tok/s, 1 stream (higher is better)", each("decode_tps"), 1),
        ("ms per decode step, 1 stream", [per_token_ms(results, n) for n in SETUPS], 1),
        ("decode tok/s, 1 stream, at rank 0's engine (ITL)", each("engine_decode_tps"), 1),
        (f"aggregate tok/s, {streams} streams (higher is better)", each("aggregate_tps"), 1),
        (
            f"decode tok/s, {streams} streams, at rank 0's engine ({streams} / mean ITL)",
            each("engine_batch_tps"),
            1,
        ),
        ("TTFT ms, 1 stream (lower is better)", each("ttft_single", 1000.0), 0),
        (f"TTFT ms, {streams} streams", each("ttft_concurrent", 1000.0), 0),
    ]


def memory_rows(results: dict[int, Result]) -> list[Row]:
    one, two = results.get(1), results.get(2)
    single_rss = mb(one.after_warm_up[0].rss_kb) if one else None
    single_hwm = mb(one.at_end[0].hwm_kb) if one else None

    def rss(rank: int) -> float | None:
        return mb(two.after_warm_up[rank].rss_kb) if two else None

    def hwm(rank: int) -> float | None:
        return mb(two.at_end[rank].hwm_kb) if two else None

    total = mb(sum(m.rss_kb for m in two.after_warm_up.values())) if two else None
    return [
        ("RSS MB after warm-up, rank 0 (1 rank: the server)", [single_rss, rss(0)], 0),
        ("RSS MB after warm-up, rank 1 (ratio: / the server)", [single_rss, rss(1)], 0),
        ("RSS MB after warm-up, all ranks", [single_rss, total], 0),
        ("peak RSS MB (VmHWM) at the end, rank 0", [single_hwm, hwm(0)], 0),
        ("peak RSS MB (VmHWM) at the end, rank 1", [single_hwm, hwm(1)], 0),
    ]


def by_rank(values: dict[int, Any]) -> str:
    return "; ".join(f"r{rank}: {v}" for rank, v in sorted(values.items())) or "?"


def text_rows(results: dict[int, Result], num_layers: int, streams: int) -> list[str]:
    def cells(fn: Any) -> str:
        return " | ".join(fn(results[n]) if n in results else "-" for n in SETUPS)

    def layers(r: Result) -> str:
        return layers_text(r, num_layers)

    def openblas(r: Result) -> str:
        return by_rank({k: "yes" if v else "no" for k, v in r.openblas.items()})

    def overlap(r: Result) -> str:
        return r.overlap.text() if r.overlap else "-"

    return [
        f"| layers per rank (GET /health placement) | {cells(layers)} | |",
        f"| allowed cores (Cpus_allowed_list) | {cells(lambda r: by_rank(r.cores))} | |",
        f"| BLAS (each rank's log) | {cells(lambda r: by_rank(r.blas))} | |",
        f"| OpenBLAS mapped in the rank processes | {cells(openblas)} | |",
        f"| steps overlapped / steps, one more {streams}-stream batch (/metrics) "
        f"| {cells(overlap)} | |",
        f"| tokens counted from | {cells(lambda r: r.measurement.tokens_from)} | |",
        f"| early stops | {cells(lambda r: str(r.measurement.early_stops))} | |",
        f"| benchmark time s | {cells(lambda r: f'{r.seconds:.0f}')} | |",
    ]


def table(run: ModeRun, streams: int, num_layers: int) -> list[str]:
    lines = [
        "| metric | 1 rank | 2 ranks | ratio (2 ranks / 1 rank) |",
        "|---|---:|---:|---:|",
    ]
    for name, (a, b), digits in speed_rows(run.results, streams) + memory_rows(run.results):
        lines.append(
            f"| {name} | {bs.fmt(a, 1, digits)} | {bs.fmt(b, 1, digits)} | {bs.ratio(b, a)} |"
        )
    lines += text_rows(run.results, num_layers, streams)
    status = ["failed" if n in run.failed else ("ok" if n in run.results else "-") for n in SETUPS]
    lines.append(f"| run | {status[0]} | {status[1]} | |")
    return lines


def mode_text(place: Placement) -> str:
    if not place.pinned:
        return (
            "every process may run on every core, BLAS threads (or CPU streams) as mlxserve "
            "picks them (the cores shared among the ranks of the host)"
        )
    ranks = ", ".join(f"rank {r} on core {core}" for r, core in enumerate(place.cores))
    return (
        f"{ranks} (taskset in the ranks' `[distributed] python`), 1 rank on core "
        f"{place.cores[0]} (`taskset -c`), MLXSERVE_BLAS_THREADS=1: two one-core machines"
    )


def overhead_line(run: ModeRun) -> list[str]:
    def step_ms(attr: str) -> float | None:
        one, two = (value(run.results, n, attr) for n in SETUPS)
        return 1000.0 / two - 1000.0 / one if one and two else None

    client, engine = step_ms("decode_tps"), step_ms("engine_decode_tps")
    if client is None or engine is None:
        return []
    return [
        f"- distributed overhead per decode step (1 stream): {client:+.1f} ms at the client, "
        f"{engine:+.1f} ms at rank 0's engine"
    ]


def mode_section(run: ModeRun, streams: int, num_layers: int) -> list[str]:
    return [
        f"### {run.place.mode} mode: {mode_text(run.place)}",
        "",
        *table(run, streams, num_layers),
        "",
        *overhead_line(run),
        *(f"- warning: {n}" for r in run.results.values() for n in r.notes),
        "",
    ]


def probe_section(runs: list[ModeRun]) -> list[str]:
    probes = [(run.place.mode, run.probe) for run in runs if run.probe is not None]
    if not probes:
        return ["### Per-step coordination cost: the probe failed (see its log)", ""]
    steps = probes[0][1].steps
    head = "| what goes out to rank 1 | bytes | encode + decode ms |"
    rule = "|---|---:|---:|"
    for mode, _ in probes:
        head += f" {mode}: round trip ms | {mode}: cost over the baseline ms |"
        rule += "---:|---:|"
    lines = [
        f"### Per-step coordination cost (coordination_probe.py, median of {steps} steps)",
        "",
        "Round trip on rank 0: send a decode step of 8 rows to rank 1, receive its (8, 1, 1024)"
        " float32 hidden states; 2 ranks under mlx.launch, ring backend, 127.0.0.1.",
        "",
        head,
        rule,
    ]
    for way, label in PROBE_WAYS.items():
        first = probes[0][1]
        codec = first.codec_ms.get(way)
        cells = [label, str(first.bytes[way]), bs.fmt(codec, 1, 3)]
        for _, probe in probes:
            cells += [f"{probe.round_trip_ms[way]:.3f}", f"{probe.cost_ms(way):+.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    cores = ", ".join(f"{mode}: {by_rank(dict(enumerate(p.cores)))}" for mode, p in probes)
    return [*lines, f"| allowed cores | {cores} |", ""]


def goal_lines(runs: list[ModeRun], streams: int) -> list[str]:
    pinned = next((run for run in runs if run.place.mode == "pinned"), None)
    if pinned is None:
        return []

    def versus(attr: str, engine: str, goal: float) -> str:
        one, two = (value(pinned.results, n, attr) for n in SETUPS)
        reached = two / one >= goal if one and two else None
        at_engine = bs.ratio(*(value(pinned.results, n, engine) for n in (2, 1)))
        return (
            f"{bs.ratio(two, one)} (goal >= {goal:g}x{met(reached)}); "
            f"decode at rank 0's engine: {at_engine}"
        )

    cost = pinned.probe.cost_ms("binary") if pinned.probe else None
    goal_ms = GOALS["coordination_ms"]
    cost_text = "-" if cost is None else f"{cost:.3f} ms"
    return [
        "### Goals (pinned mode; for the record, not asserted)",
        "",
        f"- aggregate at {streams} streams, 2 ranks / 1 rank: "
        + versus("aggregate_tps", "engine_batch_tps", GOALS["aggregate"]),
        "- single-stream decode, 2 ranks / 1 rank: "
        + versus("decode_tps", "engine_decode_tps", GOALS["single"]),
        f"- per-step coordination cost (binary plan over the baseline): {cost_text} "
        f"(goal < {goal_ms:g} ms{met(cost < goal_ms if cost is not None else None)})",
    ]


def met(ok: bool | None) -> str:
    return "" if ok is None else (": met" if ok else ": NOT met")


def report(
    runs: list[ModeRun],
    args: argparse.Namespace,
    checkpoint: Path,
    blas: str,
    seconds: float,
    load: str,
) -> str:
    params = bs.count_parameters(checkpoint)
    num_layers = bs.SIZES[args.size]["num_hidden_layers"]
    sections = [line for run in runs for line in mode_section(run, args.streams, num_layers)]
    return "\n".join(
        [
            "## Distributed benchmark (1 rank vs 2 pipeline ranks on loopback)",
            "",
            *bs.machine_info(args, params, blas),
            "- 2 ranks: `mlxserve launch`, mlx.launch ring backend over 127.0.0.1, "
            f'strategy "pipeline", split {args.split}, one micro-batch (lane) per stage',
            f"- total wall time: {seconds:.0f} s",
            load,
            "",
            *sections,
            *probe_section(runs),
            *goal_lines(runs, args.streams),
        ]
    )


# ---- main --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = bs.common_parser(__doc__.splitlines()[0], ready_timeout=180.0)
    parser.add_argument("--mode", choices=(*MODES, "both"), default="both")
    parser.add_argument(
        "--split",
        default='"even"',
        help='[distributed] split as TOML, e.g. "[9, 11]" (rank 0 first; it runs the last layers)',
    )
    parser.add_argument("--probe-steps", type=int, default=300)
    parser.add_argument("--probe-timeout", type=float, default=300.0)
    args = bs.checked_args(parser, argv)
    if args.max_tokens < 2:
        parser.error("--max-tokens must be >= 2 to measure decoding")
    if not 1 <= args.probe_steps <= 10_000:
        parser.error("--probe-steps must be in 1-10000")
    return args


def busy_note() -> str:
    """Other work on the machine skews the figures (both setups share all its cores)."""
    load = os.getloadavg()[0]
    note = f"- load average (1 min) before starting: {load:.2f}"
    if load > 1.0:
        print(f"warning: the machine is busy (load {load:.2f}); figures will be noisy", flush=True)
        note += " (busy: figures are noisy)"
    return note


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.perf_counter()
    args = parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    env, blas = bs.server_env(args.openblas)
    if not args.openblas:
        blas = "as installed (mlxserve's own loader; each rank's in the tables)"
    if "OPENBLAS_NUM_THREADS" in env:
        blas += f", OPENBLAS_NUM_THREADS={env['OPENBLAS_NUM_THREADS']} in every process"
    places = [placement(m, args, env) for m in MODES if args.mode in (m, "both")]
    load = busy_note()
    checkpoint = bs.ensure_checkpoint(args.workdir, args.size)
    print(f"checkpoint: {checkpoint}", flush=True)
    try:
        runs = [run_mode(args, checkpoint, place) for place in places]
    finally:
        for place in places:
            if place.wrapper is not None:
                place.wrapper.unlink(missing_ok=True)
    seconds = time.perf_counter() - started
    bs.publish(report(runs, args, checkpoint, blas, seconds, load), args.out)
    return 0 if all(run.ok for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
