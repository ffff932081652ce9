"""The all-reduce of tensor parallelism: each layer's shares summed over the ranks.

mlx-lm's sharded layers call ``mx.distributed.all_sum`` twice a layer for every token. Over
MLX's ring backend each call hands the array to a pool thread and to a thread per socket, and
the socket threads spin while they wait for the peer. Alone an all-reduce takes about 0.12 ms
on loopback, but on a rank with one core the spinning takes the core from the rank's own
computation: in a decode step of the 245M benchmark model (40 all-reduces), a spinning
thread had 28% of rank 0's core and the step took twice its compute share.

So the ranks also join in a full mesh of TCP connections of their own (core/cpu/native/mesh.cpp):
each rank sends its array to every other rank and sums what it receives in rank order (all ranks
get the same bits), sleeping in ``poll()`` while it waits. ``connect`` sets it up on every rank
at once, after ``Cluster.join``; where any rank cannot (no native extension, no ring hostfile to
tell the ranks' addresses, a connection refused), every rank keeps MLX's all_sum, with one log
line. ``route_all_sums`` sends the model code's ``mx.distributed.all_sum`` calls on the group
through it. ``MLXSERVE_MESH=0`` turns the mesh off.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import mlx.core as mx

from mlxserve.core.cpu.qmm import extension
from mlxserve.core.distributed.hostfile import read_hostfile

log = logging.getLogger(__name__)

DTYPES = (mx.float32, mx.float16, mx.bfloat16)
# Above two ranks the mesh sends each rank's whole array to every other rank, where a ring
# sends about two shares of it: larger arrays (a long prompt's chunk) take MLX's ring.
MESH_MAX_BYTES = 1 << 20
HELLO = struct.Struct("<qq")  # (rank, launch token): who connected
_MLX_ALL_SUM = mx.distributed.all_sum


def mlx_all_sum(x: mx.array, group: Any) -> mx.array:
    """MLX's own ``all_sum``, whatever ``route_all_sums`` did."""
    return _MLX_ALL_SUM(x, group=group)


@dataclass
class AllReduce:
    """How this rank sums arrays over its group: ``kind`` "mesh" (mlxserve's) or "mlx"
    (MLX's ``all_sum``; ``reason`` says why)."""

    group: Any
    size: int
    kind: str = "mlx"
    reason: str = ""
    _module: ModuleType | None = None
    _handle: int | None = None

    def all_sum(self, x: mx.array) -> mx.array:
        """The sum of ``x`` over the ranks (lazy, like ``mx.distributed.all_sum``)."""
        if self._takes(x):
            assert self._module is not None
            result: mx.array = self._module.mesh_all_sum(x, self._handle)
            return result
        return _MLX_ALL_SUM(x, group=self.group)

    def _takes(self, x: mx.array) -> bool:
        return (
            self._handle is not None
            and x.dtype in DTYPES
            and (self.size == 2 or x.nbytes <= MESH_MAX_BYTES)
        )

    def close(self) -> None:
        if self._module is not None and self._handle is not None:
            self._module.close_mesh(self._handle)
        self._handle = None


def connect(cluster: Any, timeout_s: float = 30.0, silence_s: float = 600.0) -> AllReduce:
    """This rank's all-reduce; every rank of ``cluster`` calls it at the same time.

    ``silence_s``: how long an all-reduce waits for a rank that sends nothing before it fails
    (a slow rank still sends; rank 0's watchdog gives up on a silent one much sooner).
    """
    reduce = AllReduce(cluster.group, cluster.size)
    module, why = _native_mesh()
    ips = _rank_ips(cluster.size)
    if module is not None and ips is None:
        why = "the ranks' addresses are not known (no ring hostfile)"
    if not _all_agree(cluster, why is None):
        reduce.reason = why or "another rank cannot join the mesh (see its log)"
        return _keep_mlx(reduce)
    assert module is not None and ips is not None
    try:
        fds = _join_mesh(cluster, ips, timeout_s)
    except OSError as exc:
        fds, why = None, f"connecting the ranks failed ({exc})"
    if not _all_agree(cluster, fds is not None):
        for fd in fds or []:
            if fd >= 0:
                os.close(fd)
        reduce.reason = why or "another rank could not connect (see its log)"
        return _keep_mlx(reduce)
    assert fds is not None
    reduce._module = module
    reduce._handle = module.open_mesh(cluster.rank, fds, round(silence_s * 1000))
    reduce.kind = "mesh"
    log.info("all-reduce: mlxserve's mesh of %d ranks (TCP, %s)", cluster.size, ips[cluster.rank])
    return reduce


def route_all_sums(reduce: AllReduce) -> Callable[[], None]:
    """Send every ``mx.distributed.all_sum`` on ``reduce``'s group (the model code's) through
    it; what undoes that."""

    def all_sum(x: mx.array, *, group: Any = None, stream: Any = None) -> mx.array:
        if group is reduce.group and stream is None:
            return reduce.all_sum(x)
        return _MLX_ALL_SUM(x, group=group, stream=stream)

    mx.distributed.all_sum = all_sum

    def undo() -> None:
        mx.distributed.all_sum = _MLX_ALL_SUM

    return undo


def _native_mesh() -> tuple[ModuleType | None, str | None]:
    if os.environ.get("MLXSERVE_MESH", "1").strip().lower() in ("0", "off", "false", "no"):
        return None, "MLXSERVE_MESH=0"
    module = extension()
    if module is None or not hasattr(module, "open_mesh"):
        return None, "mlxserve's native extension is not built (see mlxserve.core.cpu.qmm)"
    return module, None


def _rank_ips(size: int) -> list[str] | None:
    """Each rank's IP on the ring (its first ring address's): where it listens for the mesh."""
    hosts = read_hostfile()
    if not hosts or len(hosts) != size or not all(host.addresses for host in hosts):
        return None
    return [host.addresses[0][0] for host in hosts]


def _all_agree(cluster: Any, ok: bool) -> bool:
    return all(cluster.gather(1 if ok else 0))


def _keep_mlx(reduce: AllReduce) -> AllReduce:
    log.info("all-reduce: MLX's all_sum (%s)", reduce.reason)
    return reduce


def _join_mesh(cluster: Any, ips: list[str], timeout_s: float) -> list[int]:
    """Connected sockets to every other rank (-1 for this rank): each rank listens on its IP
    at a port the OS picks, the ports go round, and every rank connects to the ranks below it."""
    rank, size, token = cluster.rank, cluster.size, cluster.launch_token
    listener = socket.create_server((ips[rank], 0), backlog=size)
    listener.settimeout(timeout_s)
    peers: dict[int, socket.socket] = {}
    try:
        ports = cluster.gather(listener.getsockname()[1])
        for other in range(rank):
            conn = socket.create_connection((ips[other], ports[other]), timeout=timeout_s)
            conn.sendall(HELLO.pack(rank, token))
            peers[other] = conn
        for _ in range(rank + 1, size):
            conn, _ = listener.accept()
            conn.settimeout(timeout_s)
            other, their_token = HELLO.unpack(_receive(conn, HELLO.size))
            if their_token != token or not rank < other < size or other in peers:
                conn.close()
                raise ConnectionError(f"an unexpected connection (rank {other}) to the mesh")
            peers[other] = conn
    except BaseException:
        for conn in peers.values():
            conn.close()
        raise
    finally:
        listener.close()
    fds = []
    for other in range(size):
        if other == rank:
            fds.append(-1)
            continue
        conn = peers[other]
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.settimeout(None)
        fds.append(conn.detach())
    return fds


def _receive(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("a rank closed its mesh connection while joining")
        data += chunk
    return data
