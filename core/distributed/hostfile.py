"""The hostfile ``mlx.launch`` gives every rank (``MLX_HOSTFILE``), read in this one place.

Two shapes are read: the ring backend's, each rank's ``"ip:port"`` addresses
(``[["10.0.0.1:5000"], ["10.0.0.2:5001"]]``); and a launch hostfile's, each rank's host with the
IPs it listens on (``{"hosts": [{"ssh": "a", "ips": ["10.0.0.1"]}, ...]}``), which
``launch_hostfile`` makes from ``[distributed] hosts`` for ``mlxserve launch`` to give mlx.launch.

No MLX here: the BLAS loader (core/cpu/blas.py) reads the hostfile before MLX is imported.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mlxserve.core.errors import MlxserveError

if TYPE_CHECKING:
    from mlxserve.core.config.schema import DistributedConfig

LOCAL = "127.0.0.1"


@dataclass(frozen=True)
class RankHost:
    """One rank's entry: the IPs it listens on, and its ring addresses (none in a launch
    hostfile)."""

    ips: frozenset[str]
    addresses: tuple[tuple[str, int], ...] = ()


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
    addresses = []
    for address in host:
        ip, _, port = address.rpartition(":")
        if not ip or not port.isdigit():
            raise ValueError(f'not an "ip:port" address: {address!r}')
        addresses.append((ip.strip("[]"), int(port)))
    return RankHost(frozenset(ip for ip, _ in addresses), tuple(addresses))


def rank_zero_address(hosts: list[RankHost] | None) -> tuple[str, int] | None:
    """Rank 0's (first) ring address, if the hostfile has one."""
    if not hosts or not hosts[0].addresses:
        return None
    return hosts[0].addresses[0]


def ranks_sharing_host(hosts: list[RankHost] | None, rank: int) -> int:
    """How many ranks listen on an IP of rank ``rank`` (itself included); 1 if not known."""
    if not hosts or not 0 <= rank < len(hosts):
        return 1
    mine = hosts[rank].ips
    return max(1, sum(1 for host in hosts if host.ips & mine))


# ---- writing one for mlx.launch ------------------------------------------------------------


def launch_hostfile(config: DistributedConfig) -> dict[str, Any]:
    """mlx.launch's hostfile: whom to ssh into, and which IP each rank listens on."""
    if len(config.hosts) < 2:
        raise MlxserveError(
            "[distributed] hosts must list at least two hosts (one rank each) to launch; "
            "with one machine, run `mlxserve serve`"
        )
    hosts = []
    for host in config.hosts:
        ip = _ip(host)
        ssh = host if ip == LOCAL or not config.ssh_user else f"{config.ssh_user}@{host}"
        hosts.append({"ssh": ssh, "ips": [ip]})
    return {"backend": config.backend, "hosts": hosts}


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
