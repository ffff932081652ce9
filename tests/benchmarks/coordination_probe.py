"""Per-step coordination cost of two ranks: bench_distributed.py runs it under mlx.launch.

Usage (two ranks on loopback; rank 0 writes the medians as JSON to OUT):
    mlx.launch -n 2 --backend ring -- python tests/benchmarks/coordination_probe.py OUT
        [--steps 300]

Rank 0 times round trips to rank 1, which answers each with a (8, 1, 1024) float32 array
(``mx.distributed.send``), as the first stage of a pipeline sends its hidden states on. What
goes out to rank 1 differs, for a decode step of 8 rows with uuid request ids:

- tokens: the 8 token ids as a bare int32 array, the least a step can send (the baseline);
- binary: the step plan as the ranks send it now (``StepPlan.encode``, ``ranks.encode``,
  ``Link.send``; on rank 1 ``Link.receive``, ``ranks.decode``, ``StepPlan.decode``);
- json: the plan as JSON broadcast with two ``all_sum`` (its length, then its bytes), as the
  removed ``Cluster.broadcast`` did.

The three take turns, step by step and in a rotating order, so that drift and what one leaves
behind for the next hit them alike. Also measured on rank 0: encoding and decoding alone (no
wire), and each rank's allowed cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx

from mlxserve.core.distributed.cluster import Cluster
from mlxserve.core.distributed.ranks import Link, Op, decode, encode
from mlxserve.core.engine.plan import StepPlan

MODEL = "bench"
ROWS = 8
HIDDEN = 1024
WARM_UP = 20
MAX_STEPS = 10_000
WAYS = ("tokens", "binary", "json")


# ---- the plan, both ways ------------------------------------------------------------------


def step_plan(rng: random.Random) -> StepPlan:
    """A decode step as the scheduler makes it: request ids are uuid4().hex."""
    ids = tuple(uuid.UUID(int=rng.getrandbits(128), version=4).hex for _ in range(ROWS))
    tokens = tuple(rng.randrange(128_000) for _ in ids)
    return StepPlan(lane=1, decode_ids=ids, decode_tokens=tokens)


def binary_message(plan: StepPlan) -> bytes:
    return encode(Op.STEP, MODEL, plan.encode())


def from_binary(message: bytes) -> StepPlan:
    _, _, body = decode(message)
    return StepPlan.decode(body)


def json_message(plan: StepPlan) -> bytes:
    return json.dumps({"op": "step", "model": MODEL, "plan": asdict(plan)}).encode()


def from_json(payload: bytes) -> StepPlan:
    fields = json.loads(payload)["plan"]
    return StepPlan(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def broadcast(group: mx.distributed.Group, payload: bytes) -> bytes:
    """Rank 0's ``payload`` on both ranks (others pass b""): the old way, two collectives."""
    length = mx.distributed.all_sum(mx.array([len(payload)], dtype=mx.int64), group=group)
    size = int(length.item())
    data = mx.array(list(payload), dtype=mx.uint8) if payload else mx.zeros((size,), mx.uint8)
    return bytes(memoryview(mx.distributed.all_sum(data, group=group)))


# ---- what goes out, and how rank 1 takes it ------------------------------------------------


def send_tokens(link: Link, plan: StepPlan) -> None:
    tokens = mx.array(plan.decode_tokens, dtype=mx.int32)
    mx.eval(mx.distributed.send(tokens, 1, group=link.group))


def send_binary(link: Link, plan: StepPlan) -> None:
    link.send(binary_message(plan))


def send_json(link: Link, plan: StepPlan) -> None:
    broadcast(link.group, json_message(plan))


def receive_tokens(link: Link) -> None:
    mx.eval(mx.distributed.recv((ROWS,), mx.int32, 0, group=link.group))


def receive_binary(link: Link) -> None:
    from_binary(link.receive())


def receive_json(link: Link) -> None:
    from_json(broadcast(link.group, b""))


SENDS: dict[str, Callable[[Link, StepPlan], None]] = {
    "tokens": send_tokens,
    "binary": send_binary,
    "json": send_json,
}
RECEIVES: dict[str, Callable[[Link], None]] = {
    "tokens": receive_tokens,
    "binary": receive_binary,
    "json": receive_json,
}


# ---- the two ranks -------------------------------------------------------------------------


def turn(step: int) -> tuple[str, ...]:
    """The ways in the order of this step: each follows each other one as often."""
    first = step % len(WAYS)
    return WAYS[first:] + WAYS[:first]


def round_trips(link: Link, steps: int) -> dict[str, list[float]]:
    """Rank 0: seconds from sending each step to holding rank 1's hidden states."""
    rng = random.Random(0)
    times: dict[str, list[float]] = {way: [] for way in WAYS}
    for step in range(WARM_UP + steps):
        for way in turn(step):
            plan = step_plan(rng)
            start = time.perf_counter()
            SENDS[way](link, plan)
            mx.eval(mx.distributed.recv((ROWS, 1, HIDDEN), mx.float32, 1, group=link.group))
            if step >= WARM_UP:
                times[way].append(time.perf_counter() - start)
    return times


def answer(link: Link, steps: int) -> None:
    """Rank 1: take each step, answer with hidden states."""
    hidden = mx.zeros((ROWS, 1, HIDDEN), dtype=mx.float32)
    mx.eval(hidden)
    for step in range(WARM_UP + steps):
        for way in turn(step):
            RECEIVES[way](link)
            mx.eval(mx.distributed.send(hidden, 0, group=link.group))


def codec_seconds(steps: int) -> dict[str, list[float]]:
    """Rank 0: encoding then decoding a plan, each way, with no wire in between."""
    rng = random.Random(1)
    times: dict[str, list[float]] = {"binary": [], "json": []}
    for _ in range(steps):
        plan = step_plan(rng)
        start = time.perf_counter()
        from_binary(binary_message(plan))
        middle = time.perf_counter()
        from_json(json_message(plan))
        times["binary"].append(middle - start)
        times["json"].append(time.perf_counter() - middle)
    return times


def affinity_mask() -> int:
    return sum(1 << core for core in os.sched_getaffinity(0))


def cores_text(mask: int) -> str:
    return ",".join(str(core) for core in range(mask.bit_length()) if mask >> core & 1)


def median_ms(times: dict[str, list[float]]) -> dict[str, float]:
    return {way: statistics.median(values) * 1000.0 for way, values in times.items()}


def lead(cluster: Cluster, steps: int, out: Path) -> None:
    masks = cluster.gather(affinity_mask())
    trips = round_trips(Link(cluster), steps)
    plan = step_plan(random.Random(2))
    result = {
        "steps": steps,
        "cores": [cores_text(mask) for mask in masks],
        "round_trip_ms": median_ms(trips),
        "codec_ms": median_ms(codec_seconds(steps)),
        "bytes": {
            "tokens": ROWS * 4,
            "binary": len(binary_message(plan)),
            "json": len(json_message(plan)),
        },
    }
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="where rank 0 writes its medians (JSON)")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args(argv)
    if not 1 <= args.steps <= MAX_STEPS:
        parser.error(f"--steps must be in 1-{MAX_STEPS}")
    cluster = Cluster.join()
    if cluster.size != 2:
        parser.error(f"run it on 2 ranks under mlx.launch (found {cluster.size})")
    if cluster.rank == 0:
        lead(cluster, args.steps, args.out)
    else:
        cluster.gather(affinity_mask())
        answer(Link(cluster), args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
