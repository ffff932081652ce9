"""Where each rank's share of a model goes: which layers (pipeline) or which shard (tensor)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.nn as nn

from mlxserve.core.config import DistributedConfig
from mlxserve.core.distributed import Cluster, available_memory
from mlxserve.core.errors import MlxserveError
from mlxserve.core.pipeline import check_counts, split_by_memory, split_even, stage_ranges
from mlxserve.plugins.family import ModelFamily


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


def _strategy(family: ModelFamily, model: nn.Module, config: DistributedConfig) -> str:
    if config.strategy != "tensor":
        return "pipeline"
    if not family.supports_tensor_parallel(model):
        raise MlxserveError(
            f"family {family.name!r} has no tensor-parallel rule for this model; "
            f'use [distributed] strategy = "pipeline"'
        )
    return "tensor"


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

    strategy = _strategy(family, model, config) if cluster.distributed else "single"
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
