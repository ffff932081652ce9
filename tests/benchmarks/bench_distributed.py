"""Distributed benchmark: one rank (`mlxserve serve`) against two ranks, pipeline and tensor.

Usage:
    python tests/benchmarks/bench_distributed.py [--size large|small] [--mode shared|pinned|both]
        [--setups 1,pipeline,tensor] [--links thunderbolt,10gbe,wifi] [--max-tokens 64]
        [--streams 8] [--runs 3] [--probe-steps 300] [--split '"even"'] [--openblas [PATH]]
        [--out FILE.md] [--json FILE.json] [--workdir ~/.cache/mlxserve/bench]

On the same random-weight float32 Llama checkpoint as bench_serving.py (written once, cached
under --workdir), it starts in turn (never two servers at once), in each mode, these setups
(--setups picks among them; all by default):

- 1: one rank, `mlxserve serve`, on 127.0.0.1;
- pipeline: two ranks, `mlxserve launch` with `[distributed] hosts = ["127.0.0.1",
  "127.0.0.1"]`, strategy "pipeline", split --split (mlx.launch, ring backend over loopback);
- tensor: the same with strategy "tensor" (every layer split over both ranks; two all-reduces
  a layer for every token).

--runs counts interleaved rounds: each round starts every setup of every mode (and link) once,
in an order that rotates from round to round, so that drift on the machine hits them alike;
the tables give the medians over the rounds. A round of one setup: a warm-up request (it loads
the model), one single-stream request, one batch of --streams concurrent ones, then the two
requests below that read rank 0's GET /metrics.

Modes:

- shared: every process may run on every core, with the BLAS threads (or CPU streams) mlxserve
  picks (the cores, shared among the ranks of one host): both ranks compete for the same cores.
- pinned: the stand-in for two one-core machines. Each rank runs on a core of its own (rank r on
  the r-th core this process may use, by `taskset` in a wrapper script written to --workdir and
  given as `[distributed] python`), the 1-rank baseline on the first core (`taskset -c`), all
  with MLXSERVE_BLAS_THREADS=1. The cores each rank may use (Cpus_allowed_list in /proc) are
  read back and printed; the benchmark's own client and the launchers are not pinned.

Links (--links, none by default): the two ranks on a real network instead of loopback, each in
a Linux network namespace of its own, joined by a veth pair shaped with tc netem like the link
named (tests/support's netns.py: thunderbolt 20 Gbit/s and 20 us each way, 10gbe 10 Gbit/s and
50 us, wifi 300 Mbit/s, 2 ms and 0.1% loss). For each link the pipeline and tensor setups run
there (started by netns.py's helper, as mlx.launch starts a local rank, without ssh; placed as
the pinned mode places them when it is selected, else as the shared one, a pinned rank pinned
once it answers), in the same rounds as the rest, against the 1-rank baseline of that mode on
loopback; then the probe below runs on the link. Each link gets a table of its own. It needs
root and iproute2; where they are missing the reason is printed and the links are skipped. On a
kernel without the netem qdisc netns.py shapes the bandwidth alone, and the link's table says
there is no latency or loss.

Measured with bench_serving.py's streaming, greedy chat requests (EOS suppressed), side by side
with the ratio of each two-rank setup to one rank: single-stream decode rate, aggregate rate and
time to first token with --streams concurrent streams, and the single stream's rate end to end
(its tokens over the whole request's time: chunks held back and sent in a burst cannot lift it,
as they lift the decode rate from first chunk to last); the resident memory (VmRSS after the
warm-up request, VmHWM at the end) of every rank; the layers per rank (GET /health) and the
BLAS each rank's log reports. Streamed chunks: for every single-stream request, the time each
content chunk reached the client; the median gap between consecutive chunks (a decode step as
the client sees it), the largest gap, their ratio, and the share of the chunks that arrived in
the last tenth of the request's decode time (evenly spaced: about a tenth; tokens held back and
sent in a burst at the end: far more). That decode time ends at the last chunk and lasts from
the first, or as long as rank 0's engine took for the request's tokens (its decode rate on
GET /metrics, that round) where that is longer, so that chunks all held back and sent at once
count as late, not as evenly spaced. After the measured requests of a round come two more,
each between two reads of rank 0's GET /metrics: a batch of --streams, whose share of steps
(mlxserve_steps_total) that overlapped another lane's step in flight
(mlxserve_overlapped_steps_total) shows whether the micro-batches (mlxserve_micro_batches) kept
both ranks busy; and a single stream, whose decode rate as rank 0's engine saw it
(mlxserve_inter_token_latency_seconds) checks the client's figure, which tokens reaching the
client in bursts would skew (a warning says so).

The probe: coordination_probe.py, beside this file, runs on two ranks under mlx.launch (ring
backend, 127.0.0.1, placed as the mode says; or in a link's namespaces) and times on rank 0,
median of --probe-steps steps:

- per-step coordination: a round trip to rank 1 that answers with (8, 1, 1024) float32 hidden
  states, with the step plan (8 decode rows) sent as now (binary, Link.send), with it sent the
  old way (JSON broadcast with two all_sum), and with only the 8 token ids (the baseline). The
  plan's cost per step is its round trip minus the baseline's.
- the all-reduce: one token's hidden state, (1, hidden) float32 (hidden 1024 with --size
  large), summed over the two ranks (a) with MLX's raw `mx.distributed.all_sum` and (b) as
  mlxserve's tensor-parallel layers sum it (`mlxserve.core.distributed.allreduce`: its native
  mesh, or MLX's all_sum where it falls back; the report says which and why; "n/a" where that
  module does not exist), alone and in-graph: 2 x layers all-reduces (40 with --size large)
  each after a (1, intermediate / 2) x (intermediate / 2, hidden) matmul (1408 x 1024 with
  --size large), all in one graph as a tensor-parallel decode step has them, against the
  matmuls alone; the in-graph cost of one all-reduce is the difference over their number.

Goals (printed with PASS/MISS, not asserted), judged in pinned mode: 2 pipeline ranks >= 1.7x
one rank's aggregate at 8 streams and >= 0.95x its single stream (end to end, as below), a plan
costing < 2 ms a step; 2 tensor ranks >= 1.7x one rank's single stream (at the client, end to
end) and >= 1.8x its aggregate at 8 streams; streamed chunks evenly spaced (no gap between
consecutive chunks of a single stream over 3x the median gap, and at most 30% of them in the
last tenth of the decode time, lest a burst of them all pass for even), for every setup;
mlxserve's all-reduce <= 1.5x MLX's raw all_sum on the same link (pinned loopback and each
link); on the 10gbe link, tensor >= 1.3x one rank's single stream, end to end.

What to expect: in shared mode the two ranks share the cores one rank has to itself (with as
many BLAS threads), so no second machine's worth of compute is added: the figures show the
distributed path's cost, and what the micro-batches win back from BLAS threads that scale
poorly. Pinned, each rank has a core of its own. A pipeline keeps one micro-batch per stage in
flight, so at 8 streams both stages work at once and 2 ranks should approach 2x one rank's
aggregate; one stream is one micro-batch whose stages run one after the other: a pipeline
cannot make it faster, only a little slower, by the per-step coordination cost. Tensor
parallelism splits every layer, so each rank reads half the weights for every token: one stream
gets faster, by up to 2x where decoding is bound by reading weights, less the two all-reduces a
layer, which cost far more on a CPU rank that spins while it waits than on a sleeping one (hence
the in-graph figures), and far more on a slow link (wifi: expect tensor to lose to one rank).
Where a gap to 2x can go: rank 0's core also serves HTTP, samples and detokenizes for every
lane; a pipeline's lanes each read their stage's weights again, so where a step costs about the
same whatever its rows (memory-bound), two lanes of 4 cost what one batch of 8 does. The "at
rank 0's engine" rows leave out prefill and HTTP delivery. The small model's steps are short, so
its figures are dominated by per-step overheads; judge the goals on --size large, on a quiet
machine (a pinned rank cannot move away from other work).

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
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_serving as bs  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]  # the checkout: tests/ is a package under it
SETUPS = {"1": "1 rank (serve)", "pipeline": "2 ranks (pipeline)", "tensor": "2 ranks (tensor)"}
TWO_RANKS = ("pipeline", "tensor")
MODES = ("shared", "pinned")
LINKS = ("thunderbolt", "10gbe", "wifi")  # tests/support/netns.py's LINKS
MODEL = "bench"
PROBE = Path(__file__).resolve().with_name("coordination_probe.py")
PROBE_WAYS = {
    "tokens": "8 token ids (int32): the baseline",
    "binary": "step plan, binary (Link.send): now",
    "json": "step plan, JSON broadcast (2 x all_sum): before",
}
NO_ALLREDUCE = "mlxserve.core.distributed.allreduce not found"
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
GOALS = {
    "pipeline_aggregate": 1.7,
    "pipeline_single": 0.95,
    "coordination_ms": 2.0,
    "tensor_single": 1.7,
    "tensor_aggregate": 1.8,
    "gap_spread": 3.0,  # largest gap between streamed chunks / the median gap
    "late_share": 0.3,  # chunks in the last tenth of the decode time (even: about 0.1)
    "allreduce": 1.5,  # mlxserve's all-reduce / MLX's raw all_sum
    "tensor_single_link": 1.3,
}
GOAL_STREAMS = 8
GOAL_LINK = "10gbe"
LAST_TENTH = 0.9


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


def pin_process(pid: int, core: int) -> None:
    """Every thread of ``pid`` onto ``core`` (threads it starts later inherit it)."""
    for task in (Path("/proc") / str(pid) / "task").iterdir():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.sched_setaffinity(int(task.name), {core})


# ---- links ---------------------------------------------------------------------------------


def load_netns() -> tuple[ModuleType | None, str | None]:
    """tests/support's netns.py, or None and why the links cannot be had here."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    try:
        from tests.support import netns
    except ImportError as exc:
        return None, f"tests/support/netns.py cannot be imported ({exc})"
    reason = netns.unavailable()
    return (None, reason) if reason else (netns, None)


# ---- configuration and processes ---------------------------------------------------------


def config_text(
    args: argparse.Namespace,
    checkpoint: Path,
    setup: str,
    hosts: list[str],
    port: int | None,
    python: Path | None,
) -> str:
    """The config of ``setup``; a [server] table when ``port`` is given."""
    lines = [f'[server]\nhost = "{bs.HOST}"\nport = {port}'] if port is not None else []
    lines += [
        "[registry]",
        f'default_model = "{MODEL}"',
        f'cache_dir = "{args.workdir / "cache"}"',
        f"[models.{MODEL}]",
        f'source = "{checkpoint}"',
        "[performance]",
        f"max_batch_size = {max(8, args.streams)}",
    ]
    if setup in TWO_RANKS:
        lines += [
            "[distributed]",
            f"hosts = {json.dumps(hosts)}",
            f'strategy = "{setup}"',
            f"starting_port = {bs.free_port()}",
        ]
        if setup == "pipeline":
            lines.append(f"split = {args.split}")
        if python is not None:
            lines.append(f'python = "{python}"')
    return "\n".join(lines) + "\n"


def command(config: Path, setup: str, place: Placement) -> list[str]:
    if setup in TWO_RANKS:
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


@dataclass
class Server:
    """A running setup: rank 0's URL, each rank's pid, and the logs (rank -> its log; one log
    whose lines name their rank under mlx.launch)."""

    url: str
    pids: dict[int, int]
    logs: dict[int, Path]


@contextlib.contextmanager
def on_loopback(
    args: argparse.Namespace, checkpoint: Path, setup: str, place: Placement, log: Path
) -> Iterator[Server]:
    """Start the server (1 rank) or the launcher (2 ranks) on 127.0.0.1."""
    port = bs.free_port()
    config = log.with_suffix(".toml")
    hosts = [bs.HOST, bs.HOST]
    config.write_text(
        config_text(args, checkpoint, setup, hosts, port, place.wrapper), encoding="utf-8"
    )
    argv = command(config, setup, place)
    print(f"starting: {' '.join(argv)}  (log: {log})", flush=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=place.env, start_new_session=True
        )
    try:
        url = f"http://{bs.HOST}:{port}"
        bs.wait_ready(proc, url, log, args.ready_timeout, path="/health")
        ranks = 2 if setup in TWO_RANKS else 1
        yield Server(url, rank_pids(config, ranks, proc.pid), {0: log})
    finally:
        bs.stop_process(proc)
        kill_leftovers(config)
        config.unlink(missing_ok=True)


@contextlib.contextmanager
def on_link(
    args: argparse.Namespace, checkpoint: Path, bench: Bench, setup: str, folder: Path
) -> Iterator[Server]:
    """Start two ranks of ``setup`` in network namespaces joined by ``bench``'s link."""
    netns, place = bench.netns, bench.place
    assert netns is not None
    folder.mkdir(parents=True, exist_ok=True)
    with netns.ranks_network(2, bench.link) as network:
        bench.emulates_latency = network.emulates_latency
        text = config_text(args, checkpoint, setup, list(network.ips), None, None)
        print(f"starting: 2 ranks in {network.names}, {bench.link}  (logs: {folder})", flush=True)
        with netns.launch_ranks(
            network, folder, text, extra_env=place.env, timeout=args.ready_timeout
        ) as (url, processes):
            pids = {rank: process.pid for rank, process in enumerate(processes)}
            if place.pinned:
                for rank, pid in pids.items():
                    pin_process(pid, place.cores[rank])
            logs = {rank: folder / f"rank{rank}.log" for rank in pids}
            yield Server(url, pids, logs)


# ---- measuring ---------------------------------------------------------------------------


@dataclass
class Memory:
    rss_kb: int
    hwm_kb: int


@dataclass
class Overlap:
    """Rank 0's step counters over batches of concurrent requests."""

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
class Gaps:
    """The gaps between consecutive content chunks of single-stream requests."""

    median_ms: float | None = None
    max_ms: float | None = None
    last_tenth: float | None = None  # share of the chunks in the last tenth of decoding
    chunks: int = 0

    @property
    def spread(self) -> float | None:
        """The largest gap over the median one."""
        if self.median_ms is None or self.max_ms is None or self.median_ms <= 0:
            return None
        return self.max_ms / self.median_ms


def chunk_gaps(completions: list[bs.Completion], engine_tps: float | None) -> Gaps:
    """``completions``' gaps, pooled; the first chunk (after prefill) starts each request's.

    A request's decode time, whose last tenth counts the late chunks, ends at its last chunk
    and lasts from its first chunk, or as long as rank 0's engine took to decode its tokens
    (at ``engine_tps``) where that is longer: chunks all held back and sent at once span no
    time at the client, but count as late.
    """
    gaps: list[float | None] = []
    late = chunks = 0
    for completion in completions:
        times = completion.arrivals
        if len(times) < 3:
            continue
        gaps += [(b - a) * 1000.0 for a, b in zip(times, times[1:], strict=False)]
        span = times[-1] - times[0]
        if engine_tps:
            span = max(span, (completion.tokens - 1) / engine_tps)
        chunks += len(times) - 1
        late += sum(1 for t in times[1:] if t >= times[-1] - (1 - LAST_TENTH) * span)
    if not chunks:
        return Gaps()
    return Gaps(bs.median(gaps), max(g for g in gaps if g is not None), late / chunks, chunks)


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
    singles: list[bs.Completion] = field(default_factory=list)  # every single-stream request
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def gaps(self) -> Gaps:
        return chunk_gaps(self.singles, self.engine_decode_tps)

    @property
    def end_to_end_tps(self) -> float | None:
        """Single-stream tokens over the whole request's time, as the client sees it: unlike
        the decode rate (first chunk to last), chunks held back and sent at once cannot lift
        it."""
        singles = self.measurement.singles
        return bs.median([c.tokens / c.elapsed if c.elapsed > 0 else None for c in singles])


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


def blas_by_rank(logs: dict[int, Path]) -> dict[int, str]:
    """What each rank's log says about its BLAS: "name, N thread(s)[, M CPU streams]"."""
    found: dict[int, str] = {}
    for rank, log in logs.items():
        for line in bs.log_lines(log):
            match = BLAS_LINE.search(line)
            if match:
                streams = f", {match[4]} CPU streams" if match[4] else ""
                found[int(match[1] or rank)] = f"{match[2]}, {match[3]} thread(s){streams}"
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


def single_on_metrics(client: bs.Client, url: str) -> tuple[float | None, bs.Completion]:
    """One more single-stream request: its decode rate at rank 0's engine, and itself."""
    before = scrape(url)
    completion = client.complete()
    return per_request_rate(before, scrape(url)), completion


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
    """What rank 0's GET /metrics says over two more requests (see the module docstring)."""
    result.overlap, result.engine_batch_tps = batch_on_metrics(client, url, args.streams)
    result.engine_decode_tps, completion = single_on_metrics(client, url)
    result.singles.append(completion)
    print(
        f"  at rank 0's engine: {bs.fmt(result.engine_decode_tps)} tok/s single stream, "
        f"{bs.fmt(result.engine_batch_tps)} tok/s at {args.streams} streams; steps "
        f"overlapped: {result.overlap.text()}",
        flush=True,
    )


# ---- what one table measures ---------------------------------------------------------------


@dataclass
class Probe:
    steps: int
    cores: list[str]
    round_trip_ms: dict[str, float]
    codec_ms: dict[str, float]
    bytes: dict[str, int]
    allreduce: dict[str, Any] | None = None

    def cost_ms(self, way: str) -> float:
        return self.round_trip_ms[way] - self.round_trip_ms["tokens"]

    def reduce_ms(self, whose: str) -> float | None:
        """One all-reduce alone, "mlx" or "mlxserve"."""
        return (self.allreduce or {}).get("single_ms", {}).get(whose)

    def in_graph_ms(self, whose: str) -> float | None:
        """What one all-reduce adds to a graph of matmuls, "mlx" or "mlxserve"."""
        reduce = self.allreduce or {}
        graph = reduce.get("graph_ms", {})
        with_them, alone = graph.get(whose), graph.get("matmuls")
        if with_them is None or alone is None:
            return None
        return float((with_them - alone) / reduce["reduces"])


@dataclass
class Bench:
    """One table: the setups of a mode on loopback, or the two-rank setups on a link."""

    name: str  # the mode's, or the link's
    place: Placement
    setups: list[str]
    link: Any = None  # netns.LinkShape
    netns: ModuleType | None = None
    emulates_latency: bool = True  # False: netns.py shaped the bandwidth alone (no netem)
    rounds: dict[str, list[Result]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # setup -> why
    probe: Probe | None = None

    @property
    def label(self) -> str:
        return f"{self.name} mode" if self.link is None else f"{self.name} link"

    def result(self, setup: str) -> Result | None:
        rounds = self.rounds.get(setup)
        return combine(rounds) if rounds else None


def bench_once(
    args: argparse.Namespace, checkpoint: Path, bench: Bench, setup: str, number: int
) -> Result:
    print(f"\n== {bench.label}: {SETUPS[setup]}, round {number}/{args.runs} ==", flush=True)
    start = time.perf_counter()
    base = args.workdir / f"distributed-{bench.name}-{setup}-{os.getpid()}"
    if bench.link is None:
        server = on_loopback(args, checkpoint, setup, bench.place, base.with_suffix(".log"))
    else:
        server = on_link(args, checkpoint, bench, setup, base)
    ranks = 2 if setup in TWO_RANKS else 1
    with server as running:
        client = client_for(args, running.url, checkpoint)
        print("  loading the model (first request) ...", flush=True)
        bs.warm_up(client)
        pids = running.pids
        after = {rank: memory(pid) for rank, pid in pids.items()}
        openblas = {rank: has_openblas(pid) for rank, pid in pids.items()}
        cores = {rank: allowed_cores(pid) for rank, pid in pids.items()}
        print(f"  allowed cores: {cores}", flush=True)
        stages = placement_stages(running.url)
        measurement = bs.measure(client, 1, args.streams)
        blas = blas_by_rank(running.logs)
        result = Result(measurement, after, {}, stages, openblas, cores, blas)
        result.singles = list(measurement.singles)
        engine_figures(result, client, running.url, args)
        result.at_end = {rank: memory(pid) for rank, pid in pids.items()}
    result.seconds = time.perf_counter() - start
    gaps = result.gaps
    print(
        f"  streamed chunks: median gap {bs.fmt(gaps.median_ms)} ms, largest "
        f"{bs.fmt(gaps.max_ms)} ms, {bs.fmt(gaps.last_tenth, 100, 0)}% in the last tenth",
        flush=True,
    )
    check_decode_rate(result)
    check_pinning(result, bench.place.expected_cores(ranks))
    check_openblas(result, bool(args.openblas))
    for note in result.notes:
        print(f"  warning: {note}", flush=True)
    print(f"  {SETUPS[setup]}: done in {result.seconds:.0f} s", flush=True)
    return result


def median_memory(each: list[dict[int, Memory]]) -> dict[int, Memory]:
    ranks = sorted({rank for memories in each for rank in memories})
    found = {}
    for rank in ranks:
        rss = bs.median([m[rank].rss_kb for m in each if rank in m])
        hwm = bs.median([m[rank].hwm_kb for m in each if rank in m])
        found[rank] = Memory(int(rss or 0), int(hwm or 0))
    return found


def combine(rounds: list[Result]) -> Result:
    """One setup's rounds as one result: the medians, the counters summed."""
    ms = [r.measurement for r in rounds]

    def mid(attr: str) -> float | None:
        return bs.median([getattr(m, attr) for m in ms])

    counted = {m.tokens_from for m in ms}
    measurement = bs.Measurement(
        decode_tps=mid("decode_tps"),
        aggregate_tps=mid("aggregate_tps"),
        ttft_single=mid("ttft_single"),
        ttft_concurrent=mid("ttft_concurrent"),
        tokens_from=counted.pop() if len(counted) == 1 else "mixed",
        early_stops=sum(m.early_stops for m in ms),
        requests=sum(m.requests for m in ms),
        seconds=sum(m.seconds for m in ms),
        singles=[c for m in ms for c in m.singles],
    )
    overlaps = [r.overlap for r in rounds if r.overlap is not None]
    overlap = None
    if overlaps:
        steps = sum(o.steps for o in overlaps)
        overlap = Overlap(steps, sum(o.overlapped for o in overlaps), overlaps[-1].lanes)
    last = rounds[-1]
    return Result(
        measurement,
        median_memory([r.after_warm_up for r in rounds]),
        median_memory([r.at_end for r in rounds]),
        last.stages,
        {rank: all(r.openblas.get(rank, False) for r in rounds) for rank in last.openblas},
        last.cores,
        last.blas,
        overlap,
        bs.median([r.engine_decode_tps for r in rounds]),
        bs.median([r.engine_batch_tps for r in rounds]),
        [c for r in rounds for c in r.singles],
        sum(r.seconds for r in rounds),
        list(dict.fromkeys(n for r in rounds for n in r.notes)),
    )


def run_rounds(args: argparse.Namespace, checkpoint: Path, benches: list[Bench]) -> None:
    """--runs rounds; each starts every setup of every table once, in a rotating order."""
    jobs = [(bench, setup) for bench in benches for setup in bench.setups]
    for number in range(1, args.runs + 1):
        shift = (number - 1) % len(jobs)
        for bench, setup in jobs[shift:] + jobs[:shift]:
            if setup in bench.failed:
                continue
            try:
                result = bench_once(args, checkpoint, bench, setup, number)
            except (RuntimeError, AssertionError, httpx.HTTPError) as exc:
                why = str(exc).strip() or type(exc).__name__
                print(f"  error: {bench.label}, {SETUPS[setup]}: {why}", file=sys.stderr)
                bench.failed[setup] = why.splitlines()[0][:200]
                continue
            bench.rounds.setdefault(setup, []).append(result)


# ---- the probe ---------------------------------------------------------------------------


def probe_options(args: argparse.Namespace, out: Path) -> list[str]:
    size = bs.SIZES[args.size]
    return [
        str(PROBE), str(out), "--steps", str(args.probe_steps),
        "--hidden", str(size["hidden_size"]),
        "--inner", str(size["intermediate_size"] // 2),
        "--reduces", str(2 * size["num_hidden_layers"]),
    ]  # fmt: skip


def wait_for(processes: list[subprocess.Popen[bytes]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for proc in processes:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"  warning: the probe did not end within {timeout:g} s", flush=True)
            return


def probe_on_loopback(args: argparse.Namespace, place: Placement, out: Path, log: Path) -> None:
    python = str(place.wrapper or sys.executable)
    argv = [
        sys.executable, "-c", LAUNCHER, "-n", "2", "--backend", "ring",
        "--starting-port", str(bs.free_port()), "--python", python,
        "--", *probe_options(args, out),
    ]  # fmt: skip
    with open(log, "wb") as sink:
        # stdin kept open and empty, as `mlxserve launch` does: at its end mlx.launch spins
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=place.env,
            start_new_session=True,
        )
    try:
        wait_for([proc], args.probe_timeout)
    finally:
        bs.stop_process(proc)


def probe_on_link(args: argparse.Namespace, bench: Bench, out: Path, log: Path) -> None:
    """Both ranks in the link's namespaces, with what mlx.launch gives a local rank."""
    netns, place = bench.netns, bench.place
    assert netns is not None
    with netns.ranks_network(2, bench.link) as network:
        bench.emulates_latency = network.emulates_latency
        hostfile = out.with_suffix(".hostfile.json")
        hostfile.write_text(json.dumps(netns.ring_hostfile(network, bs.free_port())))
        python = str(place.wrapper or sys.executable)
        with open(log, "wb") as sink:
            processes = [
                network.popen(
                    rank,
                    [python, *probe_options(args, out)],
                    {**place.env, "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile)},
                    stdin=subprocess.DEVNULL,
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                )
                for rank in range(2)
            ]
        try:
            wait_for(processes, args.probe_timeout)
        finally:
            hostfile.unlink(missing_ok=True)


def run_probe(args: argparse.Namespace, bench: Bench) -> Probe | None:
    """Run coordination_probe.py on two ranks placed as ``bench`` says; None if it failed."""
    print(f"\n== {bench.label}: probe ({args.probe_steps} steps) ==", flush=True)
    out = args.workdir / f"probe-{bench.name}-{os.getpid()}.json"
    log = out.with_suffix(".log")
    out.unlink(missing_ok=True)
    try:
        if bench.link is None:
            probe_on_loopback(args, bench.place, out, log)
        else:
            probe_on_link(args, bench, out, log)
    except (RuntimeError, OSError) as exc:
        print(f"  error: the probe could not run: {exc}", file=sys.stderr, flush=True)
    if not out.exists():
        print(f"  error: the probe failed:\n{bs.log_tail(log)}", file=sys.stderr, flush=True)
        return None
    probe = Probe(**json.loads(out.read_text(encoding="utf-8")))
    out.unlink()
    print(f"  round trips (ms): {probe.round_trip_ms}; cores {probe.cores}", flush=True)
    reduce = probe.allreduce or {}
    print(
        f"  all-reduce (ms): MLX {bs.fmt(probe.reduce_ms('mlx'), digits=3)}, mlxserve "
        f"{bs.fmt(probe.reduce_ms('mlxserve'), digits=3)} ({reduce.get('kind')}"
        f"{': ' + reduce['reason'] if reduce.get('reason') else ''})",
        flush=True,
    )
    return probe


# ---- report ------------------------------------------------------------------------------

# (name, value per setup, digits, whether a ratio to 1 rank means something)
Row = tuple[str, dict[str, float | None], int, bool]


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


def value(result: Result | None, attr: str, scale: float = 1.0) -> float | None:
    """``attr`` of ``result``, or of its measurement."""
    if result is None:
        return None
    found = getattr(result if hasattr(result, attr) else result.measurement, attr)
    return None if found is None else found * scale


def per_token_ms(result: Result | None) -> float | None:
    rate = value(result, "decode_tps")
    return 1000.0 / rate if rate else None


Columns = dict[str, Result | None]  # setup -> its result (the medians of its rounds)


def speed_rows(cols: Columns, streams: int) -> list[Row]:
    def each(attr: str, scale: float = 1.0) -> dict[str, float | None]:
        return {setup: value(r, attr, scale) for setup, r in cols.items()}

    def gaps(fn: Callable[[Gaps], float | None]) -> dict[str, float | None]:
        return {setup: fn(r.gaps) if r else None for setup, r in cols.items()}

    last = f"{100 - LAST_TENTH * 100:.0f}%"
    return [
        ("decode tok/s, 1 stream (higher is better)", each("decode_tps"), 1, True),
        ("tok/s end to end, 1 stream (tokens / request time)", each("end_to_end_tps"), 1, True),
        ("ms per decode step, 1 stream", {s: per_token_ms(r) for s, r in cols.items()}, 1, True),
        ("decode tok/s, 1 stream, at rank 0's engine (ITL)", each("engine_decode_tps"), 1, True),
        (f"aggregate tok/s, {streams} streams (higher is better)", each("aggregate_tps"), 1, True),
        (
            f"decode tok/s, {streams} streams, at rank 0's engine ({streams} / mean ITL)",
            each("engine_batch_tps"),
            1,
            True,
        ),
        ("TTFT ms, 1 stream (lower is better)", each("ttft_single", 1000.0), 0, True),
        (f"TTFT ms, {streams} streams", each("ttft_concurrent", 1000.0), 0, True),
        ("streamed chunks, 1 stream: median gap ms", gaps(lambda g: g.median_ms), 1, True),
        ("streamed chunks, 1 stream: largest gap ms", gaps(lambda g: g.max_ms), 1, True),
        (
            f"largest gap / median gap (goal <= {GOALS['gap_spread']:g})",
            gaps(lambda g: g.spread),
            1,
            False,
        ),
        (
            f"% of chunks in the last {last} of the decode time (even: about {last})",
            gaps(lambda g: None if g.last_tenth is None else g.last_tenth * 100),
            0,
            False,
        ),
    ]


def memory_rows(cols: Columns) -> list[Row]:
    def of(fn: Callable[[Result], float | None]) -> dict[str, float | None]:
        return {setup: fn(r) if r else None for setup, r in cols.items()}

    def rank(r: Result, n: int, at_end: bool) -> float | None:
        memories = r.at_end if at_end else r.after_warm_up
        found = memories.get(n, memories.get(0))  # 1 rank: the server in every row
        if found is None:
            return None
        return mb(found.hwm_kb if at_end else found.rss_kb)

    def total(r: Result) -> float | None:
        return mb(sum(m.rss_kb for m in r.after_warm_up.values()))

    def rss(n: int) -> dict[str, float | None]:
        return of(lambda r: rank(r, n, False))

    def peak(n: int) -> dict[str, float | None]:
        return of(lambda r: rank(r, n, True))

    return [
        ("RSS MB after warm-up, rank 0 (1 rank: the server)", rss(0), 0, True),
        ("RSS MB after warm-up, rank 1 (ratio: / the server)", rss(1), 0, True),
        ("RSS MB after warm-up, all ranks", of(total), 0, True),
        ("peak RSS MB (VmHWM) at the end, rank 0", peak(0), 0, True),
        ("peak RSS MB (VmHWM) at the end, rank 1", peak(1), 0, True),
    ]


def by_rank(values: dict[int, Any]) -> str:
    return "; ".join(f"r{rank}: {v}" for rank, v in sorted(values.items())) or "?"


def text_rows(
    cols: Columns, num_layers: int, streams: int, status: dict[str, str], ratios: int
) -> list[str]:
    """Rows of text, with ``ratios`` empty ratio cells."""

    def cells(fn: Callable[[Result], str]) -> str:
        return " | ".join(fn(r) if r else "-" for r in cols.values())

    def openblas(r: Result) -> str:
        return by_rank({k: "yes" if v else "no" for k, v in r.openblas.items()})

    def overlap(r: Result) -> str:
        return r.overlap.text() if r.overlap else "-"

    rows = {
        "layers per rank (GET /health placement)": cells(lambda r: layers_text(r, num_layers)),
        "allowed cores (Cpus_allowed_list)": cells(lambda r: by_rank(r.cores)),
        "BLAS (each rank's log)": cells(lambda r: by_rank(r.blas)),
        "OpenBLAS mapped in the rank processes": cells(openblas),
        f"steps overlapped / steps, {streams}-stream batches (/metrics)": cells(overlap),
        "tokens counted from": cells(lambda r: r.measurement.tokens_from),
        "early stops": cells(lambda r: str(r.measurement.early_stops)),
        "streamed chunks timed (1 stream)": cells(lambda r: str(r.gaps.chunks)),
        "benchmark time s (all rounds)": cells(lambda r: f"{r.seconds:.0f}"),
        "rounds measured": " | ".join(status[setup] for setup in cols),
    }
    return [f"| {name} | {text} |" + " |" * ratios for name, text in rows.items()]


def columns_of(bench: Bench, baseline: Bench | None) -> Columns:
    """The table's columns: 1 rank (from ``baseline`` for a link), then the two-rank setups."""
    cols: Columns = {}
    one = bench if baseline is None else baseline
    if "1" in one.setups:
        cols["1"] = one.result("1")
    for setup in bench.setups:
        if setup in TWO_RANKS:
            cols[setup] = bench.result(setup)
    return cols


def status_of(bench: Bench, setup: str, runs: int) -> str:
    done = len(bench.rounds.get(setup, []))
    why = bench.failed.get(setup)
    return f"{done}/{runs}" + (f" (failed: {why})" if why else "")


def table(bench: Bench, baseline: Bench | None, args: argparse.Namespace) -> list[str]:
    cols = columns_of(bench, baseline)
    two = [s for s in cols if s in TWO_RANKS]
    ratios = two if "1" in cols else []
    where = f", {bench.name}" if bench.link is not None else ""
    heads = [("1 rank (loopback)" if s == "1" and baseline else SETUPS[s] + where) for s in cols]
    heads += [f"{s} / 1 rank" for s in ratios]
    lines = [
        "| metric | " + " | ".join(heads) + " |",
        "|---" + "|---:" * len(heads) + "|",
    ]
    num_layers = bs.SIZES[args.size]["num_hidden_layers"]
    for name, values, digits, has_ratio in speed_rows(cols, args.streams) + memory_rows(cols):
        cells = [bs.fmt(values[s], 1, digits) for s in cols]
        one = values.get("1")
        cells += [bs.ratio(values[s], one) if has_ratio else "" for s in ratios]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    status = {s: status_of(baseline or bench if s == "1" else bench, s, args.runs) for s in cols}
    return lines + text_rows(cols, num_layers, args.streams, status, len(ratios))


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


def link_text(bench: Bench) -> str:
    link = bench.link
    loss = f", {link.loss_percent:g}% loss" if link.loss_percent else ""
    shape = f"{link.rate_mbit} Mbit/s, {link.delay_us} us each way{loss}"
    if not bench.emulates_latency:
        shape = f"{link.rate_mbit} Mbit/s only: no netem here, so no latency or loss"
    return (
        f"each rank in a network namespace of its own, joined by a veth pair shaped with tc "
        f"({shape}), placed as the {bench.place.mode} mode; 1 rank: the "
        f"{bench.place.mode} mode's, on loopback"
    )


def overhead_lines(cols: Columns) -> list[str]:
    one = cols.get("1")
    lines = []
    for setup in TWO_RANKS:
        two = cols.get(setup)
        client = [per_token_ms(r) for r in (two, one)]
        engine = [value(r, "engine_decode_tps") for r in (two, one)]
        if None in client or None in engine:
            continue
        lines.append(
            f"- {setup}: time per decode step (1 stream) against 1 rank: "
            f"{client[0] - client[1]:+.1f} ms at the client, "  # type: ignore[operator]
            f"{1000.0 / engine[0] - 1000.0 / engine[1]:+.1f} ms at rank 0's engine"  # type: ignore[operator]
        )
    return lines


def section(bench: Bench, baseline: Bench | None, args: argparse.Namespace) -> list[str]:
    about = mode_text(bench.place) if bench.link is None else link_text(bench)
    cols = columns_of(bench, baseline)
    notes = [n for r in cols.values() if r for n in r.notes]
    return [
        f"### {bench.label}: {about}",
        "",
        *table(bench, baseline, args),
        "",
        *overhead_lines(cols),
        *(f"- warning: {n}" for n in dict.fromkeys(notes)),
        "",
    ]


def probe_section(benches: list[Bench]) -> list[str]:
    probes = [(bench.name, bench.probe) for bench in benches if bench.probe is not None]
    if not probes:
        return ["### Per-step coordination cost: the probe failed (see its log)", ""]
    steps = probes[0][1].steps
    head = "| what goes out to rank 1 | bytes | encode + decode ms |"
    rule = "|---|---:|---:|"
    for name, _ in probes:
        head += f" {name}: round trip ms | {name}: cost over the baseline ms |"
        rule += "---:|---:|"
    lines = [
        f"### Per-step coordination cost (coordination_probe.py, median of {steps} steps)",
        "",
        "Round trip on rank 0: send a decode step of 8 rows to rank 1, receive its (8, 1, 1024)"
        " float32 hidden states; 2 ranks under mlx.launch, ring backend, 127.0.0.1 (a link: in"
        " its namespaces).",
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
    cores = ", ".join(f"{name}: {by_rank(dict(enumerate(p.cores)))}" for name, p in probes)
    return [*lines, f"| allowed cores | {cores} |", ""]


def mlxserve_kind(probe: Probe) -> str:
    """What (b) is: "mesh", "mlx (why)", or "n/a (why)" where it was not measured."""
    reduce = probe.allreduce or {}
    kind, reason = reduce.get("kind"), reduce.get("reason")
    if kind is None:
        return f"n/a ({reason or NO_ALLREDUCE})"
    return f"{kind} ({reason})" if reason else str(kind)


def allreduce_section(benches: list[Bench]) -> list[str]:
    probes = [(b, b.probe) for b in benches if b.probe is not None and b.probe.allreduce]
    if not probes:
        return []
    first = probes[0][1].allreduce or {}
    hidden, inner, reduces = first["hidden"], first["inner"], first["reduces"]
    lines = [
        f"### All-reduce of one token, (1, {hidden}) float32 (coordination_probe.py, median "
        f"of {first['steps']} steps)",
        "",
        "Alone; and in one graph of "
        f"{reduces} all-reduces, each after a (1, {inner}) x ({inner}, {hidden}) float32 matmul "
        "(a tensor-parallel decode step's), as its cost over the same graph without them, "
        f"divided by {reduces}. (a) MLX's raw `mx.distributed.all_sum`; (b) as mlxserve's "
        "tensor-parallel layers do it (`mlxserve.core.distributed.allreduce`).",
        "",
        "| where | (b) is | (a) MLX all_sum ms | (b) mlxserve ms | (b) / (a) | in-graph (a) ms "
        f"| in-graph (b) ms | in-graph (b) / (a) | {reduces} matmuls alone ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for bench, probe in probes:
        raw, ours = probe.reduce_ms("mlx"), probe.reduce_ms("mlxserve")
        raw_graph, ours_graph = probe.in_graph_ms("mlx"), probe.in_graph_ms("mlxserve")
        na = "n/a" if (probe.allreduce or {}).get("kind") is None else "-"
        matmuls = (probe.allreduce or {}).get("graph_ms", {}).get("matmuls")
        cells = [
            bench.label,
            mlxserve_kind(probe),
            bs.fmt(raw, digits=3),
            bs.fmt(ours, digits=3) if ours is not None else na,
            bs.ratio(ours, raw),
            bs.fmt(raw_graph, digits=3),
            bs.fmt(ours_graph, digits=3) if ours_graph is not None else na,
            bs.ratio(ours_graph, raw_graph),
            bs.fmt(matmuls, digits=2),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


# ---- goals ---------------------------------------------------------------------------------


def verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("PASS" if ok else "MISS")


def at_least(new: float | None, ref: float | None, goal: float) -> str:
    """ "1.23x (goal >= 1.7x): MISS"."""
    ok = new / ref >= goal if new is not None and ref else None
    return f"{bs.ratio(new, ref)} (goal >= {goal:g}x): {verdict(ok)}"


def versus(cols: Columns, setup: str, attr: str, engine: str, goal: float) -> str:
    one, two = cols.get("1"), cols.get(setup)
    at_engine = bs.ratio(value(two, engine), value(one, engine))
    return f"{at_least(value(two, attr), value(one, attr), goal)}; at rank 0's engine: {at_engine}"


def end_to_end_versus(cols: Columns, setup: str, goal: float) -> str:
    """The end-to-end single-stream goal, with the decode rates' ratios beside it."""
    one, two = cols.get("1"), cols.get(setup)
    met = at_least(value(two, "end_to_end_tps"), value(one, "end_to_end_tps"), goal)
    decode = bs.ratio(value(two, "decode_tps"), value(one, "decode_tps"))
    engine = bs.ratio(value(two, "engine_decode_tps"), value(one, "engine_decode_tps"))
    return f"{met}; decode (first chunk to last): {decode}; at rank 0's engine: {engine}"


def ratio_goals(pinned: Bench, streams: int) -> list[str]:
    cols = columns_of(pinned, None)
    at = f"{streams} streams" + (
        "" if streams == GOAL_STREAMS else f" (goal set at {GOAL_STREAMS})"
    )
    cost = pinned.probe.cost_ms("binary") if pinned.probe else None
    goal_ms = GOALS["coordination_ms"]
    cost_text = "-" if cost is None else f"{cost:.3f} ms"

    def single(setup: str) -> str:
        return end_to_end_versus(cols, setup, GOALS[f"{setup}_single"])

    def aggregate(setup: str) -> str:
        goal = GOALS[f"{setup}_aggregate"]
        return versus(cols, setup, "aggregate_tps", "engine_batch_tps", goal)

    return [
        f"- pipeline, aggregate at {at}, 2 ranks / 1 rank: {aggregate('pipeline')}",
        f"- pipeline, single stream at the client, end to end, 2 ranks / 1 rank: "
        f"{single('pipeline')}",
        f"- pipeline, per-step coordination cost (binary plan over the baseline): {cost_text} "
        f"(goal < {goal_ms:g} ms): {verdict(cost < goal_ms if cost is not None else None)}",
        "- tensor, single stream at the client, end to end (tokens / request time), 2 ranks / "
        f"1 rank: {single('tensor')}",
        f"- tensor, aggregate at {at}, 2 ranks / 1 rank: {aggregate('tensor')}",
    ]


def gap_goal(bench: Bench, baseline: Bench | None) -> str:
    goal = GOALS["gap_spread"]
    parts = []
    for setup, result in columns_of(bench, baseline).items():
        if setup == "1" and baseline is not None:
            continue  # judged with its own mode
        gaps = result.gaps if result else Gaps()
        spread, late = gaps.spread, gaps.last_tenth
        ok = spread <= goal and late <= GOALS["late_share"] if spread and late else None
        name = "1 rank" if setup == "1" else setup
        parts.append(
            f"{name} {bs.fmt(spread, digits=2)}x, {bs.fmt(late, 100, 0)}% late {verdict(ok)}"
        )
    return (
        f"- streamed chunks evenly spaced, {bench.label} (largest gap / median gap <= {goal:g}x, "
        f"and at most {GOALS['late_share']:.0%} of the chunks in the last tenth of the decode "
        "time, where even spacing puts about a tenth: else a burst): " + "; ".join(parts)
    )


def allreduce_goal(bench: Bench) -> str:
    goal = GOALS["allreduce"]
    probe = bench.probe
    where = "loopback" if bench.link is None else "the link"
    head = f"- mlxserve's all-reduce / MLX's raw all_sum, {bench.label} ({where})"
    if probe is None or not probe.allreduce:
        return f"{head}: {verdict(None)} (the probe failed)"
    ours, raw = probe.reduce_ms("mlxserve"), probe.reduce_ms("mlx")
    if ours is None:
        return f"{head}: {mlxserve_kind(probe)}"
    ok = ours / raw <= goal if raw else None
    graph = bs.ratio(probe.in_graph_ms("mlxserve"), probe.in_graph_ms("mlx"))
    return (
        f"{head}: {bs.ratio(ours, raw)} (goal <= {goal:g}x): {verdict(ok)}; in-graph: {graph}; "
        f"(b) is {mlxserve_kind(probe)}"
    )


def goal_lines(benches: list[Bench], args: argparse.Namespace) -> list[str]:
    by_name = {b.name: b for b in benches}
    pinned = by_name.get("pinned")
    links = [b for b in benches if b.link is not None]
    lines: list[str] = []
    if pinned is not None:
        lines += ratio_goals(pinned, args.streams)
        lines.append(gap_goal(pinned, None))
    for bench in links:
        lines.append(gap_goal(bench, by_name.get(bench.place.mode)))
    for bench in ([pinned] if pinned else []) + links:
        lines.append(allreduce_goal(bench))
    goal_link = by_name.get(GOAL_LINK)
    if goal_link is not None and goal_link.link is not None:
        cols = columns_of(goal_link, by_name.get(goal_link.place.mode))
        lines.append(
            f"- tensor on the {GOAL_LINK} link, single stream end to end / 1 rank on loopback "
            f"({goal_link.place.mode}): "
            + end_to_end_versus(cols, "tensor", GOALS["tensor_single_link"])
        )
    if not lines:
        return []
    return ["### Goals (for the record, not asserted)", "", *lines, ""]


def report(
    benches: list[Bench],
    args: argparse.Namespace,
    checkpoint: Path,
    blas: str,
    seconds: float,
    notes: list[str],
) -> str:
    params = bs.count_parameters(checkpoint)
    by_name = {b.name: b for b in benches}
    sections = [
        line
        for bench in benches
        for line in section(bench, by_name.get(bench.place.mode) if bench.link else None, args)
    ]
    setups = ", ".join(SETUPS[s] for s in args.setups)
    return "\n".join(
        [
            "## Distributed benchmark (1 rank against 2 ranks, pipeline and tensor)",
            "",
            *bs.machine_info(args, params, blas),
            f"- setups: {setups}; {args.runs} interleaved round(s) (every setup started once a "
            "round, in a rotating order), medians over the rounds",
            "- 2 ranks: `mlxserve launch`, mlx.launch ring backend over 127.0.0.1; pipeline: "
            f"split {args.split}, one micro-batch (lane) per stage; tensor: every layer split "
            "over both ranks",
            f"- total wall time: {seconds:.0f} s",
            *notes,
            "",
            *sections,
            *probe_section(benches),
            *allreduce_section(benches),
            *goal_lines(benches, args),
        ]
    )


def figures(result: Result) -> dict[str, Any]:
    """One round's figures (or the medians of several), for --json."""
    m, gaps = result.measurement, result.gaps
    return {
        "decode_tps": m.decode_tps,
        "aggregate_tps": m.aggregate_tps,
        "ttft_single_s": m.ttft_single,
        "ttft_concurrent_s": m.ttft_concurrent,
        "end_to_end_tps": result.end_to_end_tps,
        "engine_decode_tps": result.engine_decode_tps,
        "engine_batch_tps": result.engine_batch_tps,
        "chunk_gaps": {**asdict(gaps), "spread": gaps.spread},
        "chunk_arrivals_s": [c.arrivals for c in result.singles],
        "memory_after_warm_up_kb": {r: asdict(v) for r, v in result.after_warm_up.items()},
        "memory_at_end_kb": {r: asdict(v) for r, v in result.at_end.items()},
        "overlap": asdict(result.overlap) if result.overlap else None,
        "stages": result.stages,
        "cores": result.cores,
        "blas": result.blas,
        "openblas": result.openblas,
        "tokens_from": m.tokens_from,
        "early_stops": m.early_stops,
        "seconds": result.seconds,
        "notes": result.notes,
    }


def write_json(path: Path, benches: list[Bench], args: argparse.Namespace) -> None:
    data = {
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "tables": {
            bench.name: {
                "placement": bench.place.mode,
                "link": asdict(bench.link) if bench.link is not None else None,
                "emulates_latency": bench.emulates_latency if bench.link is not None else None,
                "setups": {
                    setup: {
                        "rounds": [figures(r) for r in rounds],
                        "medians": figures(combine(rounds)),
                    }
                    for setup, rounds in bench.rounds.items()
                },
                "failed": bench.failed,
                "probe": asdict(bench.probe) if bench.probe else None,
            }
            for bench in benches
        },
    }
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    print(f"every round's figures written to {path}")


# ---- main --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = bs.common_parser(__doc__.splitlines()[0], ready_timeout=180.0, rounds=True)
    parser.add_argument("--mode", choices=(*MODES, "both"), default="both")
    parser.add_argument(
        "--setups",
        type=bs.names(tuple(SETUPS)),
        default=list(SETUPS),
        help=f"comma-separated from {','.join(SETUPS)} (default: all)",
    )
    parser.add_argument(
        "--links",
        type=bs.names(LINKS),
        default=[],
        help=f"also run the 2-rank setups on these emulated links, from {','.join(LINKS)} "
        "(root, iproute2 and netem; default: none)",
    )
    parser.add_argument(
        "--split",
        default='"even"',
        help='[distributed] split as TOML, e.g. "[9, 11]" (rank 0 first; it runs the last layers)',
    )
    parser.add_argument("--probe-steps", type=int, default=300)
    parser.add_argument("--probe-timeout", type=float, default=900.0)
    args = bs.checked_args(parser, argv)
    if args.max_tokens < 3:
        parser.error("--max-tokens must be >= 3 to measure decoding and its chunks' gaps")
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


def link_benches(args: argparse.Namespace, place: Placement) -> tuple[list[Bench], str]:
    """A table for each of --links, placed as ``place``; or none, and the report's line saying
    why."""
    two = [s for s in args.setups if s in TWO_RANKS]
    if not args.links:
        return [], "- links: none (--links)"
    if not two:
        return [], "- links: skipped (--setups has no 2-rank setup)"
    netns, reason = load_netns()
    if netns is None:
        print(f"links skipped: {reason}", flush=True)
        return [], f"- links: skipped: {reason}"
    missing = [name for name in args.links if name not in netns.LINKS]
    if missing:
        return [], f"- links: skipped: netns.py has no link {', '.join(missing)}"
    return [Bench(name, place, two, netns.LINKS[name], netns) for name in args.links], ""


def links_line(benches: list[Bench]) -> str:
    """The report's line about the links that ran (once their networks said how shaped)."""
    shapes = "; ".join(link_text(b).split(" (", 1)[1].split(")", 1)[0] for b in benches)
    return f"- links: {', '.join(b.name for b in benches)} ({shapes}), network namespaces, tc"


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
    benches = [Bench(place.mode, place, list(args.setups)) for place in places]
    on_links, links_note = link_benches(args, places[-1])  # pinned when it is asked for
    benches += on_links
    load = busy_note()
    checkpoint = bs.ensure_checkpoint(args.workdir, args.size)
    print(f"checkpoint: {checkpoint}", flush=True)
    probed = [b for b in benches if any(s in TWO_RANKS for s in b.setups)]
    try:
        run_rounds(args, checkpoint, benches)
        for bench in probed:
            bench.probe = run_probe(args, bench)
    finally:
        for place in places:
            if place.wrapper is not None:
                place.wrapper.unlink(missing_ok=True)
    seconds = time.perf_counter() - started
    notes = [links_note or links_line(on_links), load]
    bs.publish(report(benches, args, checkpoint, blas, seconds, notes), args.out)
    if args.json:
        write_json(args.json, benches, args)
    failed = any(b.failed for b in benches) or any(b.probe is None for b in probed)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
