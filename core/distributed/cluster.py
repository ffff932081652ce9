"""The ranks of one server: who is who, and the messages rank 0 sends to all the others.

MLX's own collectives carry everything (``mx.distributed``: the ring backend over TCP, JACCL
over RDMA on Thunderbolt, or MPI); the only other traffic is each rank's heartbeat to rank 0
(see heartbeat.py). Rank 0 serves HTTP and schedules; every other rank follows its messages.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from typing import Any, cast

import mlx.core as mx

from mlxserve.core.distributed.hostfile import JACCL_BACKENDS, heartbeat_address, launched_rank
from mlxserve.core.errors import MlxserveError

LENGTH_BYTES = 8


@dataclass
class Cluster:
    """This process's place among the ranks (one rank, alone, when not distributed)."""

    group: Any = None
    rank: int = 0
    size: int = 1
    rank_zero_address: tuple[str, int] | None = None
    launch_token: int = 0
    all_reduce: Any = None  # allreduce.AllReduce, once the ranks joined (several ranks only)

    @classmethod
    def join(cls, backend: str = "ring") -> Cluster:
        """Join the group ``mlx.launch`` (or mpirun) started this process in, or stay alone.

        Raises:
            MlxserveError: ``backend`` is not available on this machine, or MLX could not
                form the group with it.
        """
        if launched_rank() is None:
            return cls()
        refuse_unavailable(backend)
        try:
            group = mx.distributed.init(strict=True, backend=mlx_backend(backend))
        except (RuntimeError, ValueError) as exc:
            raise MlxserveError(
                f'[distributed] backend = "{backend}": MLX could not form the group: {exc}'
            ) from exc
        cluster = cls(group, group.rank(), group.size(), heartbeat_address())
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


# Why a backend is not available, by MLX's name for it.
UNAVAILABLE = {
    "jaccl": "MLX's RDMA backend is not available on this machine (it needs macOS 26.2+ with "
    "RDMA enabled over Thunderbolt 5; see docs/distributed.md)",
    "mpi": "MLX cannot load Open MPI's library (libmpi) on this machine; install Open MPI "
    "(apt-get install openmpi-bin, or brew install open-mpi), or set MLX_MPI_LIBNAME to its "
    "libmpi's path (see docs/distributed.md)",
    "ring": "this build of MLX has no ring backend",
}


def mlx_backend(backend: str) -> str:
    """MLX's name for a ``[distributed] backend``: "jaccl-ring" is JACCL, told to form a ring
    by mlx.launch (``MLX_JACCL_RING``)."""
    return "jaccl" if backend in JACCL_BACKENDS else backend


def refuse_unavailable(backend: str) -> None:
    """Refuse a backend MLX cannot use on this machine (``mx.distributed.is_available``: whether
    MLX can start it here, not yet whether the others answer).

    Raises:
        MlxserveError: saying why, and what it needs.
    """
    name = mlx_backend(backend)
    if not mx.distributed.is_available(name):
        raise MlxserveError(f'[distributed] backend = "{backend}": {UNAVAILABLE[name]}')


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
