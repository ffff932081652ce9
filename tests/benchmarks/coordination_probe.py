"""Per-step coordination and all-reduce cost of two ranks: bench_distributed.py runs it under
mlx.launch (or in two network namespaces, with the environment mlx.launch gives a rank).

Usage (two ranks on loopback; rank 0 writes the medians as JSON to OUT):
    mlx.launch -n 2 --backend ring -- python tests/benchmarks/coordination_probe.py OUT
        [--steps 300] [--hidden 1024] [--inner 1408] [--reduces 40]

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

Then the all-reduce of tensor parallelism, --steps steps more, on rank 0 (each timed item
after an untimed barrier, so that neither rank waits for the other's previous work): one
token's hidden state, a (1, --hidden) float32 array, summed over the ranks

- mlx: with MLX's own ``mx.distributed.all_sum``;
- mlxserve: as mlxserve's tensor-parallel layers sum it, with the ``AllReduce`` that
  ``mlxserve.core.distributed.allreduce.connect`` sets up ("mesh", mlxserve's own, or "mlx",
  its fallback to MLX's all_sum, with the reason); where that module does not exist, not
  measured (null, and the reason);

alone, and --reduces of them (two a layer: 40 for the 20 layers of the large benchmark model)
in one graph, each after a (1, --inner) x (--inner, --hidden) float32 matmul whose result it
sums and on which the next matmul's input depends, as a tensor-parallel decode step's layers
do (a row-split MLP: --inner is the intermediate size over the ranks, 1408 for the large
model on 2), against the same graph without the all-reduces ("matmuls"). The in-graph cost of
one all-reduce is (graph - matmuls) / --reduces. These five items take turns as the three
above do.
"""

from __future__ import annotations

import argparse
import importlib
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
from typing import Any

from mlxserve.core.cpu.startup import prepare_mlx

prepare_mlx()  # before MLX is imported: the BLAS the ranks' matmuls run on, as in the server

import mlx.core as mx  # noqa: E402

from mlxserve.core.distributed.cluster import Cluster  # noqa: E402
from mlxserve.core.distributed.ranks import Link, Op, decode, encode  # noqa: E402
from mlxserve.core.engine.plan import StepPlan  # noqa: E402

MODEL = "bench"
ROWS = 8
HIDDEN = 1024
WARM_UP = 20
MAX_STEPS = 10_000
WAYS = ("tokens", "binary", "json")
ALLREDUCE_MODULE = "mlxserve.core.distributed.allreduce"
# (what, whose): an all-reduce alone, or a step's graph of matmuls with or without them
REDUCE_ITEMS = (
    ("single", "mlx"),
    ("single", "mlxserve"),
    ("graph", "matmuls"),
    ("graph", "mlx"),
    ("graph", "mlxserve"),
)


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


def turn(step: int, ways: tuple[Any, ...] = WAYS) -> tuple[Any, ...]:
    """The ways in the order of this step: each follows each other one as often."""
    first = step % len(ways)
    return ways[first:] + ways[:first]


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


# ---- the all-reduce ------------------------------------------------------------------------

Sum = Callable[[mx.array], mx.array]


def mlxserve_all_reduce(cluster: Cluster) -> tuple[Any, str]:
    """(mlxserve's AllReduce, "") or (None, why not); every rank calls it at once."""
    try:
        allreduce = importlib.import_module(ALLREDUCE_MODULE)
    except ImportError as exc:  # the same on every rank
        if isinstance(exc, ModuleNotFoundError) and exc.name == ALLREDUCE_MODULE:
            return None, f"{ALLREDUCE_MODULE} not found"
        return None, f"{ALLREDUCE_MODULE} cannot be imported ({exc})"
    reduce = allreduce.connect(cluster)
    return reduce, getattr(reduce, "reason", "")


class Reducer:
    """The all-reduce probe's work, the same on both ranks."""

    def __init__(self, cluster: Cluster, args: argparse.Namespace, ours: Any) -> None:
        group = cluster.group
        self.sums: dict[str, Sum] = {"mlx": lambda x: mx.distributed.all_sum(x, group=group)}
        if ours is not None:
            self.sums["mlxserve"] = ours.all_sum
        self.items = tuple(item for item in REDUCE_ITEMS if item[1] in (*self.sums, "matmuls"))
        self.group = group
        self.token = mx.zeros((1, args.hidden), dtype=mx.float32)
        self.x = mx.random.normal((1, args.inner), key=mx.random.key(0))
        scale = args.inner**-0.5
        keys = mx.random.split(mx.random.key(1), args.reduces)
        self.weights = [mx.random.normal((args.inner, args.hidden), key=k) * scale for k in keys]
        self.barrier_token = mx.zeros((1,), dtype=mx.float32)
        mx.eval(self.token, self.x, self.weights, self.barrier_token)

    def barrier(self) -> None:
        mx.eval(mx.distributed.all_sum(self.barrier_token, group=self.group))

    def graph(self, whose: str) -> mx.array:
        """The matmuls of a step, each result summed over the ranks unless ``whose`` is
        "matmuls"; each matmul's input depends on the previous result."""
        reduce = self.sums.get(whose)
        u = self.x
        for w in self.weights:
            h = u @ w
            if reduce is not None:
                h = reduce(h)
            u = self.x + 1e-3 * h[:, :1]
        return u

    def run(self, item: tuple[str, str]) -> float:
        """Seconds ``item`` takes on this rank, after a barrier."""
        what, whose = item
        self.barrier()
        start = time.perf_counter()
        if what == "single":
            mx.eval(self.sums[whose](self.token))
        else:
            mx.eval(self.graph(whose))
        return time.perf_counter() - start

    def times(self, steps: int) -> dict[str, list[float]]:
        found: dict[str, list[float]] = {f"{what}:{whose}": [] for what, whose in self.items}
        for step in range(WARM_UP + steps):
            for item in turn(step, self.items):
                seconds = self.run(item)
                if step >= WARM_UP:
                    found[":".join(item)].append(seconds)
        return found


def all_reduce_figures(
    cluster: Cluster, args: argparse.Namespace, steps: int
) -> dict[str, Any] | None:
    """Both ranks: time the all-reduce items; rank 0's medians (None on rank 1)."""
    ours, reason = mlxserve_all_reduce(cluster)
    try:
        medians = median_ms(Reducer(cluster, args, ours).times(steps))
    finally:
        if ours is not None and hasattr(ours, "close"):
            ours.close()
    if cluster.rank != 0:
        return None
    return {
        "steps": steps,
        "hidden": args.hidden,
        "inner": args.inner,
        "reduces": args.reduces,
        "kind": getattr(ours, "kind", None),
        "reason": reason,
        "single_ms": {w: medians.get(f"single:{w}") for w in ("mlx", "mlxserve")},
        "graph_ms": {w: medians.get(f"graph:{w}") for w in ("matmuls", "mlx", "mlxserve")},
    }


# ---- main ----------------------------------------------------------------------------------


def lead(cluster: Cluster, args: argparse.Namespace) -> None:
    steps, out = args.steps, args.out
    masks = cluster.gather(affinity_mask())
    trips = round_trips(Link(cluster), steps)
    reduces = all_reduce_figures(cluster, args, steps)
    plan = step_plan(random.Random(2))  # rank 1 is done: the codec is timed alone
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
        "allreduce": reduces,
    }
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="where rank 0 writes its medians (JSON)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--hidden", type=int, default=HIDDEN, help="the model's hidden size")
    parser.add_argument(
        "--inner", type=int, default=1408, help="each rank's share of the intermediate size"
    )
    parser.add_argument(
        "--reduces", type=int, default=40, help="all-reduces in a step (two a layer)"
    )
    args = parser.parse_args(argv)
    if not 1 <= args.steps <= MAX_STEPS:
        parser.error(f"--steps must be in 1-{MAX_STEPS}")
    if min(args.hidden, args.inner, args.reduces) < 1:
        parser.error("--hidden, --inner and --reduces must be >= 1")
    cluster = Cluster.join()
    if cluster.size != 2:
        parser.error(f"run it on 2 ranks under mlx.launch (found {cluster.size})")
    if cluster.rank == 0:
        lead(cluster, args)
    else:
        cluster.gather(affinity_mask())
        answer(Link(cluster), args.steps)
        all_reduce_figures(cluster, args, args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
