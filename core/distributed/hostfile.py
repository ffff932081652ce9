"""What a launcher tells every rank, and the hostfile ``mlxserve launch`` gives the launcher.

Read by every rank: its rank (``MLX_RANK`` from mlx.launch, ``OMPI_COMM_WORLD_RANK`` from
Open MPI's mpirun); the hostfile mlx.launch gives the ring backend's ranks (``MLX_HOSTFILE``),
in either of its two shapes: each rank's ``"ip:port"`` addresses
(``[["10.0.0.1:5000"], ["10.0.0.2:5001"]]``), or a launch hostfile's hosts with the IPs they
listen on (``{"hosts": [{"ssh": "a", "ips": ["10.0.0.1"]}, ...]}``); and where rank 0 hears
heartbeats (``heartbeat_address``).

Written for the launcher: ``launch_hostfile`` makes mlx.launch's hostfile from ``[distributed]``
(``hosts``, with ``rdma_devices`` for JACCL), or checks the one ``[distributed] hostfile`` names
(as ``mlx.distributed_config`` writes it); ``mpi_hostfile`` turns it into mpirun's.

No MLX here: the BLAS loader (core/cpu/blas.py) reads the hostfile before MLX is imported.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlxserve.core.errors import MlxserveError

if TYPE_CHECKING:
    from mlxserve.core.config.schema import DistributedConfig

LOCAL = "127.0.0.1"
# Set by `mlxserve launch` on every rank, whatever the backend: rank 0's "ip:port" for
# heartbeats (UDP, port [distributed] starting_port).
RANK_ZERO_ENV = "MLXSERVE_RANK_ZERO_ADDRESS"
# What JACCL's ranks are given by mlx.launch: rank 0's "ip:port" (its TCP side channel).
JACCL_COORDINATOR_ENVS = ("JACCL_COORDINATOR", "MLX_JACCL_COORDINATOR")
JACCL_BACKENDS = ("jaccl", "jaccl-ring")


@dataclass(frozen=True)
class RankHost:
    """One rank's entry: the IPs it listens on, and its ring addresses (none in a launch
    hostfile)."""

    ips: frozenset[str]
    addresses: tuple[tuple[str, int], ...] = ()


# ---- what every rank reads ------------------------------------------------------------------


def launched_rank(environ: Mapping[str, str] | None = None) -> int | None:
    """This process's rank as its launcher gave it (mlx.launch's ``MLX_RANK``, Open MPI's
    ``OMPI_COMM_WORLD_RANK``); None when no launcher started it."""
    environ = os.environ if environ is None else environ
    for name in ("MLX_RANK", "OMPI_COMM_WORLD_RANK"):
        value = environ.get(name, "")
        if value.isdigit():
            return int(value)
    return None


def read_hostfile(path: str | os.PathLike[str] | None = None) -> list[RankHost] | None:
    """Each rank's entry, in rank order, from ``path`` (default: ``MLX_HOSTFILE``); None
    without a hostfile, or if it cannot be read or is not one of the two shapes."""
    if path is None:
        path = os.environ.get("MLX_HOSTFILE")
        if not path:
            return None
    try:
        with open(path, encoding="utf-8") as hostfile:
            return parse_hostfile(json.load(hostfile))
    except (OSError, ValueError):
        return None


def parse_hostfile(data: Any) -> list[RankHost]:
    """Each rank's entry of a hostfile's JSON; ValueError if it is not a hostfile."""
    hosts = data["hosts"] if isinstance(data, dict) and "hosts" in data else data
    if not isinstance(hosts, list):
        raise ValueError('a hostfile is a list of hosts, or {"hosts": [...]}')
    return [_rank_host(host) for host in hosts]


def _rank_host(host: Any) -> RankHost:
    if isinstance(host, dict):
        ips = host.get("ips")
        if not isinstance(ips, list) or not all(isinstance(ip, str) for ip in ips):
            raise ValueError(f"a launch hostfile's host lists its IPs: {host!r}")
        return RankHost(frozenset(ips))
    if not isinstance(host, list) or not all(isinstance(a, str) for a in host):
        raise ValueError(f'a ring hostfile\'s host lists "ip:port" addresses: {host!r}')
    addresses = tuple(parse_address(address) for address in host)
    return RankHost(frozenset(ip for ip, _ in addresses), addresses)


def parse_address(address: str) -> tuple[str, int]:
    """``"ip:port"`` (``"[v6]:port"`` too) as (ip, port); ValueError if it is not one."""
    ip, _, port = address.rpartition(":")
    if not ip or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f'not an "ip:port" address: {address!r}')
    return ip.strip("[]"), int(port)


def rank_zero_address(hosts: list[RankHost] | None) -> tuple[str, int] | None:
    """Rank 0's (first) ring address, if the hostfile has one."""
    if not hosts or not hosts[0].addresses:
        return None
    return hosts[0].addresses[0]


def heartbeat_address(environ: Mapping[str, str] | None = None) -> tuple[str, int] | None:
    """Where rank 0 hears heartbeats (UDP): what `mlxserve launch` said (``RANK_ZERO_ENV``,
    any backend); else, for ranks mlx.launch started by hand, rank 0's first ring address
    (ring) or JACCL's coordinator (jaccl), both on port ``starting_port``; None if not known
    (mpirun started by hand)."""
    environ = os.environ if environ is None else environ
    given = _address_in(environ, RANK_ZERO_ENV)
    if given is not None:
        return given
    ring_hostfile = environ.get("MLX_HOSTFILE")
    ring = rank_zero_address(read_hostfile(ring_hostfile)) if ring_hostfile else None
    if ring is not None:
        return ring
    for name in JACCL_COORDINATOR_ENVS:
        coordinator = _address_in(environ, name)
        if coordinator is not None:
            return coordinator
    return None


def _address_in(environ: Mapping[str, str], name: str) -> tuple[str, int] | None:
    try:
        return parse_address(environ[name])
    except (KeyError, ValueError):
        return None


def ranks_sharing_host(hosts: list[RankHost] | None, rank: int) -> int:
    """How many ranks listen on an IP of rank ``rank`` (itself included); 1 if not known."""
    if not hosts or not 0 <= rank < len(hosts):
        return 1
    mine = hosts[rank].ips
    return max(1, sum(1 for host in hosts if host.ips & mine))


# ---- the RDMA devices of JACCL --------------------------------------------------------------

Devices = Sequence[Sequence[Sequence[str]]]


Problems = list[tuple[tuple[int, ...], str]]


def rdma_problems(devices: Devices, ring: bool) -> Problems:
    """Why JACCL could not use ``devices`` (row i: host i's RDMA devices to each host, in hosts
    order; none to itself) as a mesh (``ring``: as a ring of hosts in that order); each reason
    with the (row, column) it is at. JACCL's mesh uses each pair's first device; its ring
    wants as many devices to each neighbour as host 0 has to host 1."""
    n = len(devices)
    problems: Problems = [
        ((i,), f"has {len(row)} entries for {n} hosts: one per host, none for the host itself")
        for i, row in enumerate(devices)
        if len(row) != n
    ]
    if problems:
        return problems
    for i, row in enumerate(devices):
        for j, names in enumerate(row):
            neighbour = (j - i) % n in (1, n - 1)
            if i == j and names:
                problems.append(((i, j), "a host has no RDMA device to itself: leave it empty"))
            elif i != j and not names and (neighbour or not ring):
                need = (
                    "jaccl-ring needs one to each neighbour in hosts order"
                    if ring
                    else "jaccl needs a Thunderbolt link between every two hosts (hosts cabled "
                    "in a ring take backend jaccl-ring)"
                )
                problems.append(((i, j), f"no RDMA device from host {i} to host {j}: {need}"))
    if ring and not problems and n > 1:
        count = len(devices[0][1])
        for i, row in enumerate(devices):
            if {len(row[(i - 1) % n]), len(row[(i + 1) % n])} != {count}:
                message = f"needs {count} devices to each neighbour, as host 0 has to host 1"
                problems.append(((i,), message))
    return problems


def rdma_names(entry: Any) -> list[str]:
    """An RDMA entry (None or "" for none, a name, or a list of names) as a list of names."""
    if entry is None or entry == "":
        return []
    return [entry] if isinstance(entry, str) else list(entry)


def _launch_entry(entry: str | list[str]) -> str | list[str] | None:
    """A ``rdma_devices`` entry as mlx.launch's hostfile writes it (null for none)."""
    names = rdma_names(entry)
    return None if not names else names[0] if len(names) == 1 else names


# ---- writing one for the launcher -----------------------------------------------------------


def launch_hostfile(config: DistributedConfig) -> dict[str, Any]:
    """mlx.launch's hostfile: whom to ssh into, which IP each rank listens on and, for JACCL,
    each host's RDMA devices. That of ``config.hostfile`` when it is set (checked against the
    rest of ``config``), else made from ``config.hosts``.

    Raises:
        MlxserveError: fewer than two hosts, a host that does not resolve, or a hostfile that
            cannot serve ``config.backend``.
    """
    if config.hostfile is not None:
        data = _read_launch_hostfile(config.hostfile)
        check_launch_hostfile(data, config, f"[distributed] hostfile {str(config.hostfile)!r}")
        return data
    if len(config.hosts) < 2:
        raise MlxserveError(
            "[distributed] hosts must list at least two hosts (one rank each) to launch; "
            "with one machine, run `mlxserve serve`"
        )
    hosts = []
    for i, host in enumerate(config.hosts):
        ip = _ip(host)
        ssh = host if ip == LOCAL or not config.ssh_user else f"{config.ssh_user}@{host}"
        entry: dict[str, Any] = {"ssh": ssh, "ips": [ip]}
        if config.backend in JACCL_BACKENDS:
            entry["rdma"] = [_launch_entry(names) for names in config.rdma_devices[i]]
        hosts.append(entry)
    return {"backend": config.backend, "hosts": hosts}


def _read_launch_hostfile(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except OSError as exc:
        why = exc.strerror or str(exc)
        raise MlxserveError(
            f"[distributed] hostfile {str(path)!r}: cannot read it ({why})"
        ) from exc
    except ValueError as exc:
        raise MlxserveError(f"[distributed] hostfile {str(path)!r}: not JSON ({exc})") from exc


def check_launch_hostfile(data: Any, config: DistributedConfig, where: str) -> None:
    """Refuse a launch hostfile (mlx.launch's shape) that cannot serve ``config``.

    Raises:
        MlxserveError: naming ``where`` and what is wrong.
    """
    hosts = data.get("hosts") if isinstance(data, dict) else data
    if not isinstance(hosts, list) or not all(isinstance(host, dict) for host in hosts):
        raise MlxserveError(f'{where}: must be {{"hosts": [{{"ssh": ..., "ips": [...]}}, ...]}}')
    for i, host in enumerate(hosts):
        ips, rdma = host.get("ips", []), host.get("rdma", [])
        if not isinstance(host.get("ssh"), str) or not host["ssh"]:
            raise MlxserveError(f'{where}: host {i} has no "ssh" name')
        if not isinstance(ips, list) or not all(isinstance(ip, str) for ip in ips):
            raise MlxserveError(f'{where}: host {i}\'s "ips" must be a list of IP addresses')
        if not isinstance(rdma, list) or not all(_is_rdma_entry(entry) for entry in rdma):
            raise MlxserveError(
                f'{where}: host {i}\'s "rdma" must list a device (a name, a list of names, or '
                "null) for each host"
            )
    if len(hosts) < 2:
        raise MlxserveError(f"{where}: lists {len(hosts)} host(s); launching needs two or more")
    backend = data.get("backend") if isinstance(data, dict) else None
    if backend and backend != config.backend:
        raise MlxserveError(
            f'{where}: is for backend "{backend}" but [distributed] backend = '
            f'"{config.backend}"; set backend = "{backend}"'
        )
    if config.hosts and len(config.hosts) != len(hosts):
        raise MlxserveError(
            f"{where}: lists {len(hosts)} hosts but [distributed] hosts lists "
            f"{len(config.hosts)}; list the same hosts in the same order, or leave hosts empty"
        )
    for key in ("split", "memory_limit_mb"):
        value = getattr(config, key)
        if not config.hosts and isinstance(value, list) and value and len(value) != len(hosts):
            raise MlxserveError(
                f"[distributed] {key} has {len(value)} entries for the {len(hosts)} hosts of "
                f"{where}; give one per host"
            )
    _check_backend_needs(hosts, config.backend, where)


def _is_rdma_entry(entry: Any) -> bool:
    if entry is None or isinstance(entry, str):
        return True
    return isinstance(entry, list) and all(isinstance(name, str) and name for name in entry)


def _check_backend_needs(hosts: list[dict[str, Any]], backend: str, where: str) -> None:
    if backend == "ring":
        bare = [i for i, host in enumerate(hosts) if not host.get("ips")]
        if bare:
            raise MlxserveError(
                f'{where}: the ring backend needs every host\'s "ips" (host {bare[0]} has none)'
            )
    if backend in JACCL_BACKENDS:
        if not hosts[0].get("ips"):
            raise MlxserveError(
                f'{where}: JACCL needs rank 0\'s "ips": the address the other ranks reach it at'
            )
        devices = [[rdma_names(entry) for entry in host.get("rdma", [])] for host in hosts]
        problems = rdma_problems(devices, ring=backend == "jaccl-ring")
        if problems:
            at, message = problems[0]
            raise MlxserveError(f'{where}: "rdma" of host {at[0]}: {message}')
    if backend == "mpi":
        seen: list[str] = []
        for host in hosts:
            if host["ssh"] in seen and seen[-1] != host["ssh"]:
                raise MlxserveError(
                    f"{where}: with backend mpi, list a host's ranks next to each other "
                    f"({host['ssh']!r} is not): mpirun numbers each host's ranks together"
                )
            seen.append(host["ssh"])


def heartbeat_target(data: Any, port: int) -> str | None:
    """``"ip:port"`` where rank 0 hears heartbeats, for ``RANK_ZERO_ENV``: rank 0's first IP in
    the launch hostfile (or its ssh name resolved) on ``port``; None if neither is known."""
    first = (data["hosts"] if isinstance(data, dict) else data)[0]
    ips = first.get("ips") or []
    if ips:
        ip = ips[0]
    else:
        try:
            ip = socket.gethostbyname(first["ssh"].rpartition("@")[2])
        except OSError:
            return None
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def mpi_hostfile(data: Any) -> str:
    """mpirun's hostfile for a launch hostfile: each host once, with as many slots as it has
    ranks, in rank order."""
    hosts = data["hosts"] if isinstance(data, dict) else data
    slots: dict[str, int] = {}
    for host in hosts:
        slots[host["ssh"]] = slots.get(host["ssh"], 0) + 1
    return "".join(f"{ssh} slots={count}\n" for ssh, count in slots.items())


def _ip(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        return socket.gethostbyname(host)
    except OSError as exc:
        raise MlxserveError(
            f"[distributed] hosts: cannot resolve {host!r} ({exc}); use its IP address"
        ) from exc
