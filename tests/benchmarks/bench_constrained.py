"""Constrained-decoding benchmark: mlxserve's tokens/s with a JSON schema against without one.

Usage:
    python tests/benchmarks/bench_constrained.py [--size small|large] [--max-tokens 64]
        [--streams 8] [--runs 3] [--openblas [PATH]] [--out FILE.md]
        [--workdir ~/.cache/mlxserve/bench]

It reuses bench_serving.py's random-weight float32 Llama checkpoint (written once under
--workdir), starts one mlxserve on 127.0.0.1 and measures streaming, greedy
POST /v1/chat/completions three ways:

- plain: no response_format;
- json string: ``{"answer": "<free string>"}``;
- json records: an array of ``{"id": <integer>, "name": <string of at most 8>, "ok": <bool>}``.

So that every request runs to max_tokens, EOS is suppressed with logit_bias, and so are the
tokens that would end the JSON: every token with a double quote (json string) or a closing
bracket (json records) in it; the grammar still decides everything else. Each figure is a
median of --runs (workloads take turns within each run): single-stream decode tokens/s, and
aggregate tokens/s with --streams concurrent requests; each JSON workload's ratio to plain.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_serving as bs  # noqa: E402

RECORD = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 99999},
        "name": {"type": "string", "maxLength": 8},
        "ok": {"type": "boolean"},
    },
    "required": ["id", "name", "ok"],
    "additionalProperties": False,
}
WORKLOADS: dict[str, tuple[dict[str, Any] | None, str | None]] = {
    "plain": (None, None),
    "json string": (
        {
            "type": "object",
            "properties": {"answer": {"type": "string"}},
            "required": ["answer"],
            "additionalProperties": False,
        },
        '"',
    ),
    "json records": ({"type": "array", "items": RECORD}, "]"),
}


@dataclass
class SchemaClient(bs.Client):
    response_format: dict[str, Any] | None = None
    extra_bias: dict[str, float] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        body = super().body()
        body["logit_bias"] = {**body.get("logit_bias", {}), **self.extra_bias}
        if self.response_format is not None:
            body["response_format"] = self.response_format
        return body


def tokens_containing(checkpoint: Path, text: str) -> list[int]:
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(checkpoint)
    vocab = len(tokenizer._tokenizer)
    return [i for i in range(vocab) if text in tokenizer.decode([i])]


def client_for(
    workload: str, base_url: str, args: argparse.Namespace, checkpoint: Path
) -> SchemaClient:
    schema, banned = WORKLOADS[workload]
    fmt = (
        None
        if schema is None
        else {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    )
    return SchemaClient(
        base_url=base_url,
        model="bench",
        max_tokens=args.max_tokens,
        timeout=args.request_timeout,
        logit_bias={str(t): -100.0 for t in bs.eos_token_ids(checkpoint)},
        response_format=fmt,
        extra_bias={str(t): -100.0 for t in tokens_containing(checkpoint, banned)}
        if banned
        else {},
    )


def measure(clients: dict[str, SchemaClient], runs: int, streams: int) -> dict[str, bs.Measurement]:
    """Each run measures every workload in turn, so that drift in the machine's speed (other
    processes) spreads over all workloads rather than favouring one."""
    for client in clients.values():
        bs.warm_up(client)
        bs.concurrent(client, streams)
    single: dict[str, list[bs.Completion]] = {w: [] for w in clients}
    aggregate: dict[str, list[float | None]] = {w: [] for w in clients}
    for run in range(runs):
        for workload, client in clients.items():
            single[workload].append(client.complete())
            completions, wall = bs.concurrent(client, streams)
            aggregate[workload].append(sum(c.tokens for c in completions) / wall)
            print(
                f"  run {run + 1}/{runs} {workload}: 1 stream "
                f"{bs.fmt(single[workload][-1].decode_rate)} tok/s, {streams} streams "
                f"{bs.fmt(aggregate[workload][-1])} tok/s",
                flush=True,
            )
    return {
        w: bs.Measurement(
            decode_tps=bs.median([c.decode_rate for c in single[w]]),
            aggregate_tps=bs.median(aggregate[w]),
            early_stops=bs.note_early_stops(w, single[w], clients[w].max_tokens),
        )
        for w in clients
    }


def bench(
    args: argparse.Namespace, checkpoint: Path, env: dict[str, str]
) -> dict[str, bs.Measurement]:
    port = bs.free_port()
    command = bs.server_command("mlxserve", checkpoint, args.workdir, port, args.streams)
    log = args.workdir / "constrained.log"
    with bs.running_server(command, port, log, env, args.ready_timeout) as base_url:
        clients = {w: client_for(w, base_url, args, checkpoint) for w in WORKLOADS}
        return measure(clients, args.runs, args.streams)


def report(
    results: dict[str, bs.Measurement], args: argparse.Namespace, params: int, blas: str
) -> str:
    plain = results["plain"]
    lines = [
        f"| workload | decode tok/s, 1 stream | ratio | aggregate tok/s, {args.streams} streams "
        "| ratio | early stops |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for workload, m in results.items():
        lines.append(
            f"| {workload} | {bs.fmt(m.decode_tps)} | {bs.ratio(m.decode_tps, plain.decode_tps)} "
            f"| {bs.fmt(m.aggregate_tps)} | {bs.ratio(m.aggregate_tps, plain.aggregate_tps)} "
            f"| {m.early_stops} |"
        )
    info = bs.machine_info(args, params, blas)
    return "\n".join(["## Constrained-decoding benchmark", "", *info, "", *lines])


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = bs.common_parser(__doc__.splitlines()[0])
    parser.set_defaults(size="small")
    args = bs.checked_args(parser, argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    env, blas = bs.server_env(args.openblas)
    checkpoint = bs.ensure_checkpoint(args.workdir, args.size)
    params = bs.count_parameters(checkpoint)
    start = time.perf_counter()
    results = bench(args, checkpoint, env)
    print(f"\ndone in {time.perf_counter() - start:.0f} s", flush=True)
    bs.publish(report(results, args, params, blas), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
