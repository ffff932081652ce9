"""Distributed benchmark: one rank (`mlxserve serve`) against two pipeline ranks on loopback.

Usage:
    python tests/benchmarks/bench_distributed.py [--size large|small] [--max-tokens 64]
        [--streams 8] [--runs 3] [--openblas [PATH]] [--out FILE.md]
        [--workdir ~/.cache/mlxserve/bench]

On the same random-weight float32 Llama checkpoint as bench_serving.py (written once, cached
under --workdir), it starts in turn (never both at once) on 127.0.0.1:

- 1 rank: `mlxserve serve`;
- 2 ranks: `mlxserve launch` with `[distributed] hosts = ["127.0.0.1", "127.0.0.1"]`,
  strategy "pipeline", split "even" (mlx.launch, ring backend over loopback);

and measures both with bench_serving.py's streaming, greedy chat requests (EOS suppressed): the
single-stream decode rate, the aggregate rate and time to first token with --streams concurrent
streams, plus the resident memory (VmRSS from /proc, after one warm-up request; VmHWM at the end)
of every rank process and the placement GET /health reports (layers per rank). Figures are given
side by side with their ratio, 2 ranks / 1 rank. --openblas preloads a system OpenBLAS
(LD_PRELOAD) into every process; mlx.launch passes the environment on to local ranks, and the
script checks in /proc/<pid>/maps that each rank really loaded it.

What to expect: on one 2-core machine both ranks share the same 2 cores, and a pipeline runs its
stages one after the other for every token, so two ranks cannot be faster than one; decode can
only be slower, by the per-step cost of the distributed path (a broadcast of the step plan,
activations sent over loopback, the ranks waking each other up). The point of this benchmark is
that overhead, and the memory per rank: each rank holds about half of the layers' weights.

With --openblas, each process's OpenBLAS starts one thread per core, and its threads spin for a
while after each call: two ranks on one machine then oversubscribe the cores, and most of the
2-rank slowdown is that contention rather than the distributed path. Run with
OPENBLAS_NUM_THREADS=1 in the environment (passed on to every rank) to see the path's own cost.
"""

from __future__ import annotations

import argparse
import contextlib
import os
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
MODEL = "bench"


# ---- configuration and processes ---------------------------------------------------------


def write_config(args: argparse.Namespace, checkpoint: Path, ranks: int, port: int) -> Path:
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
            'split = "even"',
            f"starting_port = {bs.free_port()}",
        ]
    # Named after this process: concurrent runs sharing --workdir must not meet.
    path = args.workdir / f"mlxserve-distributed-{ranks}-{os.getpid()}.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def command(config: Path, ranks: int) -> list[str]:
    verb = "serve" if ranks == 1 else "launch"
    return [bs.mlxserve_executable(), verb, "--config", str(config)]


def launch_env(env: dict[str, str]) -> dict[str, str]:
    """The benchmark's environment, without settings that would override the config file."""
    return {k: v for k, v in env.items() if not k.startswith(("MLXSERVE_", "MLX_"))}


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
        if b"mlxserve.server.cli" not in read_proc(pid, "cmdline"):
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
    args: argparse.Namespace, checkpoint: Path, ranks: int, env: dict[str, str]
) -> Iterator[tuple[str, dict[int, int]]]:
    """Start the server (1 rank) or the launcher (2 ranks); yield its URL and rank pids."""
    port = bs.free_port()
    config = write_config(args, checkpoint, ranks, port)
    argv = command(config, ranks)
    log = args.workdir / f"distributed-{ranks}-{os.getpid()}.log"
    print(f"starting: {' '.join(argv)}  (log: {log})", flush=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
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
class Result:
    measurement: bs.Measurement
    after_warm_up: dict[int, Memory]
    at_end: dict[int, Memory]
    stages: list[dict[str, Any]]
    openblas: dict[int, bool]
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def memory(pid: int) -> Memory:
    values: dict[str, int] = {}
    for line in read_proc(pid, "status").decode(errors="replace").splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    if len(values) != 2:
        raise RuntimeError(f"cannot read the memory of pid {pid} (has it exited?)")
    return Memory(rss_kb=values["VmRSS"], hwm_kb=values["VmHWM"])


def has_openblas(pid: int) -> bool:
    return b"libopenblas" in read_proc(pid, "maps")


def placement_stages(url: str) -> list[dict[str, Any]]:
    body = httpx.get(f"{url}/health", timeout=10.0).json()
    return (body.get("placement") or {}).get(MODEL, {}).get("stages", [])


def bench_setup(
    args: argparse.Namespace, checkpoint: Path, ranks: int, env: dict[str, str]
) -> Result:
    print(f"\n== {SETUPS[ranks]} ==", flush=True)
    start = time.perf_counter()
    with running(args, checkpoint, ranks, launch_env(env)) as (url, pids):
        client = bs.Client(
            base_url=f"{url}/v1",
            model=MODEL,
            max_tokens=args.max_tokens,
            timeout=args.request_timeout,
            logit_bias={str(t): -100.0 for t in bs.eos_token_ids(checkpoint)},
        )
        print("  loading the model (first request) ...", flush=True)
        bs.warm_up(client)
        after = {rank: memory(pid) for rank, pid in pids.items()}
        openblas = {rank: has_openblas(pid) for rank, pid in pids.items()}
        stages = placement_stages(url)
        measurement = bs.measure(client, args.runs, args.streams)
        at_end = {rank: memory(pid) for rank, pid in pids.items()}
    result = Result(measurement, after, at_end, stages, openblas, time.perf_counter() - start)
    if args.openblas and not all(openblas.values()):
        missing = [rank for rank, loaded in openblas.items() if not loaded]
        result.notes.append(f"OpenBLAS was NOT loaded by rank(s) {missing}")
        print(f"  warning: {result.notes[-1]}", flush=True)
    print(f"  {SETUPS[ranks]}: done in {result.seconds:.0f} s", flush=True)
    return result


# ---- report ------------------------------------------------------------------------------


def mb(kb: int | None) -> float | None:
    return None if kb is None else kb / 1024


def layers_text(result: Result | None, num_layers: int) -> str:
    if result is None:
        return "-"
    if not result.stages:
        return f"all {num_layers} (0-{num_layers - 1})"
    parts = []
    for s in result.stages:
        first, last = s["layers"]
        parts.append(
            f"r{s['rank']}: {first}-{last} ({last - first + 1}, {s['bytes'] / 2**20:.0f} MB)"
        )
    return "; ".join(parts)


def speed_rows(
    results: dict[int, Result], streams: int
) -> list[tuple[str, list[float | None], int]]:
    def get(ranks: int, attr: str) -> float | None:
        result = results.get(ranks)
        return getattr(result.measurement, attr) if result else None

    def per_token(ranks: int) -> float | None:
        rate = get(ranks, "decode_tps")
        return 1000.0 / rate if rate else None

    def ms(ranks: int, attr: str) -> float | None:
        value = get(ranks, attr)
        return None if value is None else value * 1000.0

    return [
        ("decode tok/s, 1 stream (higher is better)", [get(n, "decode_tps") for n in SETUPS], 1),
        ("ms per decode step, 1 stream", [per_token(n) for n in SETUPS], 1),
        (
            f"aggregate tok/s, {streams} streams (higher is better)",
            [get(n, "aggregate_tps") for n in SETUPS],
            1,
        ),
        ("TTFT ms, 1 stream (lower is better)", [ms(n, "ttft_single") for n in SETUPS], 0),
        (f"TTFT ms, {streams} streams", [ms(n, "ttft_concurrent") for n in SETUPS], 0),
    ]


def memory_rows(results: dict[int, Result]) -> list[tuple[str, list[float | None], int]]:
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


def text_rows(results: dict[int, Result], num_layers: int) -> list[str]:
    def cells(fn: Any) -> str:
        return " | ".join(fn(results.get(n)) if results.get(n) else "-" for n in SETUPS)

    def blas(r: Result) -> str:
        return ", ".join(f"r{k}: {'yes' if v else 'no'}" for k, v in sorted(r.openblas.items()))

    def layers(r: Result) -> str:
        return layers_text(r, num_layers)

    return [
        f"| layers per rank (GET /health placement) | {cells(layers)} | |",
        f"| OpenBLAS mapped in the rank processes | {cells(blas)} | |",
        f"| tokens counted from | {cells(lambda r: r.measurement.tokens_from)} | |",
        f"| early stops | {cells(lambda r: str(r.measurement.early_stops))} | |",
        f"| benchmark time s | {cells(lambda r: f'{r.seconds:.0f}')} | |",
    ]


def table(results: dict[int, Result], failed: list[int], streams: int, num_layers: int) -> str:
    lines = [
        "| metric | 1 rank | 2 ranks | ratio (2 ranks / 1 rank) |",
        "|---|---:|---:|---:|",
    ]
    for name, (a, b), digits in speed_rows(results, streams) + memory_rows(results):
        lines.append(
            f"| {name} | {bs.fmt(a, 1, digits)} | {bs.fmt(b, 1, digits)} | {bs.ratio(b, a)} |"
        )
    lines += text_rows(results, num_layers)
    status = ["failed" if n in failed else ("ok" if n in results else "-") for n in SETUPS]
    lines.append(f"| run | {status[0]} | {status[1]} | |")
    return "\n".join(lines)


def overhead_line(results: dict[int, Result]) -> list[str]:
    rates = [results[n].measurement.decode_tps if n in results else None for n in SETUPS]
    if None in rates:
        return []
    one, two = (1000.0 / r for r in rates if r)
    return [f"- distributed overhead per decode step (1 stream): {two - one:+.1f} ms"]


def report(
    results: dict[int, Result],
    failed: list[int],
    args: argparse.Namespace,
    checkpoint: Path,
    blas: str,
    seconds: float,
    load: str,
) -> str:
    params = bs.count_parameters(checkpoint)
    num_layers = bs.SIZES[args.size]["num_hidden_layers"]
    notes = [f"- warning: {n}" for r in results.values() for n in r.notes]
    return "\n".join(
        [
            "## Distributed benchmark (1 rank vs 2 pipeline ranks on loopback)",
            "",
            *bs.machine_info(args, params, blas),
            "- 2 ranks: `mlxserve launch`, mlx.launch ring backend over 127.0.0.1, "
            'strategy "pipeline", split "even"; both ranks share the same cores',
            f"- total wall time: {seconds:.0f} s",
            load,
            "",
            table(results, failed, args.streams, num_layers),
            "",
            *overhead_line(results),
            *notes,
        ]
    )


# ---- main --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = bs.common_parser(__doc__.splitlines()[0], ready_timeout=180.0)
    args = bs.checked_args(parser, argv)
    if args.max_tokens < 2:
        parser.error("--max-tokens must be >= 2 to measure decoding")
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
    if "OPENBLAS_NUM_THREADS" in env:
        blas += f", OPENBLAS_NUM_THREADS={env['OPENBLAS_NUM_THREADS']} in every process"
    load = busy_note()
    checkpoint = bs.ensure_checkpoint(args.workdir, args.size)
    print(f"checkpoint: {checkpoint}", flush=True)
    results: dict[int, Result] = {}
    failed: list[int] = []
    for ranks in SETUPS:
        try:
            results[ranks] = bench_setup(args, checkpoint, ranks, env)
        except (RuntimeError, httpx.HTTPError) as exc:
            print(f"  error: {SETUPS[ranks]} failed: {exc}", file=sys.stderr, flush=True)
            failed.append(ranks)
    seconds = time.perf_counter() - started
    bs.publish(report(results, failed, args, checkpoint, blas, seconds, load), args.out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
