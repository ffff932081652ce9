"""Where each rank's share of a model goes: which layers (pipeline) or which shard (tensor)."""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn

from mlxserve.core.config.schema import DistributedConfig
from mlxserve.core.distributed.cluster import Cluster, available_memory
from mlxserve.core.errors import MlxserveError
from mlxserve.core.model.stages import check_counts, split_by_memory, split_even, stage_ranges
from mlxserve.plugins.family import ModelFamily

log = logging.getLogger(__name__)
# "auto" splits every layer (tensor) only when that pays at least this many times its cost.
TENSOR_MARGIN = 2.0


@dataclass(frozen=True)
class StagePlacement:
    rank: int
    host: str
    layers: range
    nbytes: int

    def to_json(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "host": self.host,
            "layers": [self.layers.start, self.layers.stop - 1],
            "bytes": self.nbytes,
        }


@dataclass(frozen=True)
class Placement:
    """Every rank's share of one model. In a pipeline, rank 0 (which samples) runs the last
    layers and the last rank the first ones, so logits arrive where they are needed."""

    strategy: str
    stages: tuple[StagePlacement, ...]

    def for_rank(self, rank: int) -> StagePlacement:
        return self.stages[rank]

    def role(self, rank: int) -> tuple[bool, bool]:
        """(first, last) of ``rank``'s pipeline stage: the last rank embeds, rank 0 samples."""
        return rank == len(self.stages) - 1, rank == 0

    def describe(self) -> str:
        return "; ".join(
            f"rank {s.rank} ({s.host}): layers {s.layers.start}-{s.layers.stop - 1}, "
            f"{s.nbytes / 2**20:.1f} MiB"
            for s in self.stages
        )


def _strategy(
    family: ModelFamily, model: nn.Module, config: DistributedConfig, cluster: Cluster
) -> str:
    if config.strategy == "auto":
        return _auto_strategy(family, model, cluster)
    if config.strategy != "tensor":
        return "pipeline"
    if not family.supports_tensor_parallel(model):
        raise MlxserveError(
            f"family {family.name!r} has no tensor-parallel rule for this model; "
            f'use [distributed] strategy = "pipeline"'
        )
    return "tensor"


def _auto_strategy(family: ModelFamily, model: nn.Module, cluster: Cluster) -> str:
    """Tensor parallelism when the link is fast enough for it to pay, else a pipeline.

    Splitting every layer takes two all-reduces per layer for each token; in exchange each
    rank reads only its share of the weights. A pipeline costs one hop per stage and, with
    micro-batches, keeps every rank busy at high concurrency, but gives one stream no speed.
    The link and the memory are measured here, and rank 0's figures decide for everyone.
    """
    if not family.supports_tensor_parallel(model):
        log.info('strategy "auto": pipeline (family %s cannot split this model)', family.name)
        return "pipeline"
    weights = family.layer_weights(model)
    hidden = int(getattr(getattr(model, "args", None), "hidden_size", 4096))
    reduce = cluster.all_reduce
    link_us = cluster.gather(_all_reduce_us(hidden, _all_sum(reduce, cluster)))[0]
    mlx_us = link_us
    if reduce is not None and reduce.kind != "mlx":
        mlx_us = cluster.gather(_all_reduce_us(hidden, _all_sum(None, cluster)))[0]
    bandwidth_mb_s = cluster.gather(_matvec_mb_per_s())[0]
    cost_ms = 2 * len(weights) * link_us / 1000
    saved_ms = sum(weights) / 2**20 / max(bandwidth_mb_s, 1) * 1000 * (1 - 1 / cluster.size)
    choice = "tensor" if saved_ms >= TENSOR_MARGIN * cost_ms else "pipeline"
    log.info(
        'strategy "auto": %s. An all-reduce over this link takes %.3f ms (%s; MLX\'s own '
        "all_sum: %.3f ms), so splitting each of the %d layers would cost %.2f ms a token, "
        "against %.2f ms a token of weight reading it would spare rank 0 (at %.1f GiB/s); "
        "tensor only when that pays %gx",
        choice,
        link_us / 1000,
        "MLX's all_sum" if reduce is None else f"the {reduce.kind} all-reduce",
        mlx_us / 1000,
        len(weights),
        cost_ms,
        saved_ms,
        bandwidth_mb_s / 1024,
        TENSOR_MARGIN,
    )
    return choice


def _median_seconds(work: Callable[[], None], repeats: int) -> float:
    work()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _all_sum(reduce: Any, cluster: Cluster) -> Callable[[mx.array], mx.array]:
    """The all-reduce tensor-parallel layers use (``reduce``), or MLX's own without one."""
    if reduce is not None:
        return cast("Callable[[mx.array], mx.array]", reduce.all_sum)
    from mlxserve.core.distributed.allreduce import mlx_all_sum

    return lambda x: mlx_all_sum(x, cluster.group)


def _all_reduce_us(hidden: int, all_sum: Callable[[mx.array], mx.array]) -> int:
    """One token's all-reduce of a hidden state, in microseconds."""
    x = mx.zeros((1, hidden), dtype=mx.float32)
    seconds = _median_seconds(lambda: mx.eval(all_sum(x)), repeats=20)
    return round(seconds * 1e6)


def _matvec_mb_per_s() -> int:
    """How fast this rank reads float32 weights in a one-token matmul, in MB/s."""
    weights = [mx.random.normal((1024, 4096)) for _ in range(4)]  # 64 MiB: past most caches
    x = mx.random.normal((1, 4096))
    mx.eval(weights, x)
    seconds = _median_seconds(lambda: mx.eval([x @ w.T for w in weights]), repeats=5)
    return round(sum(w.nbytes for w in weights) / 2**20 / seconds)


def _free_memory(cluster: Cluster, config: DistributedConfig) -> list[int]:
    free = cluster.gather(available_memory())
    limits = [mb * 2**20 for mb in config.memory_limit_mb] or free
    return [min(f, limit) for f, limit in zip(free, limits, strict=True)]


def plan_placement(
    family: ModelFamily, model: nn.Module, cluster: Cluster, config: DistributedConfig
) -> Placement:
    """Share ``model`` (built, weights not read) among the ranks, the same way on every rank.

    Raises:
        ModelDoesNotFitError: with ``split = "memory"``, when the layers cannot fit.
    """
    weights = family.layer_weights(model)
    hosts = config.hosts or ["localhost"] * cluster.size

    def host(rank: int) -> str:
        return hosts[rank] if rank < len(hosts) else f"rank {rank}"

    strategy = _strategy(family, model, config, cluster) if cluster.distributed else "single"
    if strategy in ("single", "tensor"):
        share = sum(weights) // cluster.size
        everything = range(len(weights))
        return Placement(
            strategy,
            tuple(StagePlacement(r, host(r), everything, share) for r in range(cluster.size)),
        )
    if config.split == "memory":
        by_stage = split_by_memory(weights, list(reversed(_free_memory(cluster, config))))
    elif config.split == "even":
        by_stage = split_even(len(weights), cluster.size)
    else:
        if len(config.split) != cluster.size:
            raise MlxserveError(
                f"[distributed] split has {len(config.split)} entries for {cluster.size} ranks"
            )
        by_stage = list(reversed(check_counts(config.split, len(weights))))
    ranges = stage_ranges(by_stage)
    stages = []
    for rank in range(cluster.size):
        layers = ranges[cluster.size - 1 - rank]
        stages.append(StagePlacement(rank, host(rank), layers, sum(weights[i] for i in layers)))
    return Placement("pipeline", tuple(stages))
