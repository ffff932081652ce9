"""The ranks of one server: who is who, and the messages rank 0 sends to all the others.

MLX's own collectives carry everything (``mx.distributed``, ring backend over TCP); the only
other traffic is each rank's heartbeat to rank 0 (see heartbeat.py). Rank 0 serves HTTP and
schedules; every other rank follows its messages.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from typing import Any, cast

import mlx.core as mx

from mlxserve.core.distributed.hostfile import rank_zero_address, read_hostfile

LENGTH_BYTES = 8


@dataclass
class Cluster:
    """This process's place among the ranks (one rank, alone, when not distributed)."""

    group: Any = None
    rank: int = 0
    size: int = 1
    rank_zero_address: tuple[str, int] | None = None
    launch_token: int = 0

    @classmethod
    def join(cls, backend: str = "ring") -> Cluster:
        """Join the group ``mlx.launch`` started this process in, or stay alone."""
        if "MLX_RANK" not in os.environ:
            return cls()
        group = mx.distributed.init(strict=True, backend=backend)
        cluster = cls(group, group.rank(), group.size(), rank_zero_address(read_hostfile()))
        if cluster.distributed:
            # Tells this launch's heartbeats from those of a stale rank of an earlier one.
            token = secrets.randbits(62) if cluster.rank == 0 else 0
            tokens = mx.distributed.all_sum(mx.array([token], dtype=mx.int64), group=group)
            cluster.launch_token = int(tokens)
        return cluster

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def gather(self, value: int) -> list[int]:
        """Every rank's ``value``, in rank order."""
        if not self.distributed:
            return [value]
        gathered = mx.distributed.all_gather(mx.array([value], dtype=mx.int64), group=self.group)
        return cast("list[int]", gathered.tolist())


def available_memory() -> int:
    """Bytes this machine can still give to weights and caches."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    if hasattr(mx, "metal") and mx.metal.is_available():
        info = mx.metal.device_info()
        usable = int(info.get("max_recommended_working_set_size", info["memory_size"]))
        return max(0, usable - mx.get_active_memory())
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
