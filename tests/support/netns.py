"""Ranks on real networks: each rank in a Linux network namespace of its own, the namespaces
joined by veth pairs shaped with ``tc netem`` (latency, bandwidth, loss), for the link tests
(tests/process/test_links.py) and the benchmarks.

Needs root, iproute2 (``ip``, ``tc``) and the kernel's netem qdisc (sch_netem); ``unavailable()``
says which is missing. Two ranks get one veth pair between their namespaces; more ranks meet on
a bridge in a hub namespace. The test, in the root namespace, reaches rank 0's HTTP port over an
unshaped veth of its own on a small subnet, and talks only to addresses of namespaces it made.

Everything a network makes (namespaces, veths, qdiscs) and every process it starts is removed or
killed on the way out of ``ranks_network``, also after a failure. Names carry this process's pid
and a counter, so that concurrent runs never meet.

On a kernel without netem (Firecracker's, as on the development machine and CI) the links'
bandwidth alone is shaped, with ``tbf``, so that the namespaces, the ranks' plumbing, a cut
link and a slow one are still tested; ``Network.emulates_latency`` is then False,
``no_latency_reason()`` says why, and the tests that need the latency or the loss skip.
"""

from __future__ import annotations

import functools
import ipaddress
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlxserve.core.config.schema import load_config

from .processes import two_ranks_config, wait_until_healthy


@dataclass(frozen=True)
class LinkShape:
    """A link between two machines: its one-way latency, its bandwidth (each way) and the share
    of packets it loses (each way)."""

    name: str
    delay_us: int
    rate_mbit: int
    loss_percent: float = 0.0


LINKS: dict[str, LinkShape] = {
    shape.name: shape
    for shape in (
        LinkShape("thunderbolt", delay_us=20, rate_mbit=20_000),
        LinkShape("10gbe", delay_us=50, rate_mbit=10_000),
        LinkShape("wifi", delay_us=2_000, rate_mbit=300, loss_percent=0.1),
    )
}

SHAPED = "shaped"  # each rank's shaped interface, inside its namespace
CLIENT = "client"  # rank 0's end of the test's own veth, inside rank 0's namespace
SUBNET = "10.77.0"  # the shaped link's addresses: seen only inside the namespaces
# The test's veths, one /30 each, in the root namespace: the shared address space (RFC 6598),
# which no LAN hands out.
CLIENT_NETS = ipaddress.IPv4Network("100.64.0.0/10")
_networks = itertools.count()


class NetnsError(RuntimeError):
    """An ``ip`` or ``tc`` command failed."""


def _tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    tool = _tool(argv[0]) or argv[0]
    done = subprocess.run([tool, *argv[1:]], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise NetnsError(f"`{' '.join(argv)}` failed: {(done.stderr or done.stdout).strip()}")
    return done


def _qdisc(link: LinkShape, rate_only: bool) -> list[str]:
    """The root qdisc that shapes one end's egress like ``link``.

    netem on each end shapes what leaves it: with the full delay on both ends, each direction
    is delayed once, by the one-way latency the figures give (a round trip takes twice that);
    half the delay on each end would make the one-way latency half the link's. The rate and
    the loss are per direction too, as on a full-duplex link.
    """
    if rate_only:
        rate_bytes = link.rate_mbit * 125_000
        burst = max(64 * 1024, rate_bytes // 1000)  # at least one GSO packet, or 1 ms of data
        return ["tbf", "rate", f"{link.rate_mbit}mbit", "burst", str(burst), "latency", "50ms"]
    shape = ["netem", "delay", f"{link.delay_us}us", "rate", f"{link.rate_mbit}mbit"]
    if link.loss_percent:
        shape += ["loss", f"{link.loss_percent:g}%"]
    return [*shape, "limit", "10000"]


def _figure(pattern: str, shown: str, units: dict[str, float]) -> float | None:
    """A figure ``tc qdisc show`` printed (``pattern``: its number, then its unit), in the
    base unit of ``units``."""
    found = re.search(pattern, shown)
    return None if found is None else float(found[1]) * units[found[2]]


def _check_qdisc(namespace: str, link: LinkShape, rate_only: bool) -> None:
    """Fail unless ``tc qdisc show`` gives the shape asked for (tc may refuse parts quietly)."""
    shown = _run("tc", "-n", namespace, "qdisc", "show", "dev", SHAPED).stdout
    mbit = {"": 1e-6, "K": 1e-3, "M": 1, "G": 1e3, "T": 1e6}
    rate = _figure(r"\brate (\d+(?:\.\d+)?)([KMGT]?)bit", shown, mbit)
    ok = f"qdisc {'tbf' if rate_only else 'netem'} " in shown
    ok = ok and rate is not None and abs(rate - link.rate_mbit) <= 0.01 * link.rate_mbit
    if not rate_only:
        delay = _figure(
            r"\bdelay (\d+(?:\.\d+)?)(us|ms|s)\b", shown, {"us": 1, "ms": 1e3, "s": 1e6}
        )
        loss = _figure(r"\bloss (\d+(?:\.\d+)?)(%)", shown, {"%": 1})
        ok = ok and delay is not None and abs(delay - link.delay_us) <= 0.01 * link.delay_us + 1
        ok = ok and (loss or 0.0) == link.loss_percent
    if not ok:
        raise NetnsError(f"{namespace}: {SHAPED} is not shaped as {link}: {shown.strip()}")


def unavailable() -> str | None:
    """Why namespaces with shaped links cannot be made here, or None if they can."""
    return _probe()[0]


def no_latency_reason() -> str | None:
    """Why the links have no latency or loss here (no netem: bandwidth alone), or None."""
    return _probe()[2]


@functools.cache
def _probe() -> tuple[str | None, bool, str | None]:
    """(why shaped namespaces cannot be made here or None, whether netem shapes them, why it
    does not): tried once per process on a veth pair in a namespace of its own."""
    if os.geteuid() != 0:
        return "network namespaces and tc need root", False, None
    missing = [tool for tool in ("ip", "tc") if _tool(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not found: install iproute2", False, None
    probe = f"mlxs{os.getpid()}probe"
    try:
        _run("ip", "netns", "add", probe)
    except (NetnsError, OSError, subprocess.SubprocessError) as exc:
        return f"cannot make a network namespace: {exc}", False, None
    wifi = LINKS["wifi"]
    try:
        veth = ["type", "veth", "peer", "name", "probe"]
        _run("ip", "-n", probe, "link", "add", "name", SHAPED, *veth)
        try:
            _run("tc", "-n", probe, "qdisc", "add", "dev", SHAPED, "root", *_qdisc(wifi, False))
            _check_qdisc(probe, wifi, False)
            return None, True, None
        except NetnsError as exc:
            no_netem = f"the kernel has no netem qdisc (sch_netem), so no latency or loss: {exc}"
        _run("tc", "-n", probe, "qdisc", "del", "dev", SHAPED, "root", check=False)
        _run("tc", "-n", probe, "qdisc", "add", "dev", SHAPED, "root", *_qdisc(wifi, True))
        _check_qdisc(probe, wifi, True)
        return None, False, no_netem
    except (NetnsError, OSError, subprocess.SubprocessError) as exc:
        return f"cannot make a shaped veth pair: {exc}", False, None
    finally:
        _run("ip", "netns", "del", probe, check=False)


@dataclass
class Network:
    """Ranks' namespaces and the links between them (made by ``ranks_network``)."""

    names: list[str]  # one namespace per rank
    ips: list[str]  # rank r's IP on the shaped link(s)
    client_url_host: str  # where the test reaches rank 0's HTTP port
    link: LinkShape
    emulates_latency: bool = True  # False: no netem here, the bandwidth alone is shaped
    hub: str | None = None  # the bridge's namespace, with more than two ranks
    client_interface: str = ""  # the test's end of its veth to rank 0, in the root namespace
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _made: list[str] = field(default_factory=list)  # namespaces made so far

    def popen(
        self, rank: int, argv: list[str], env: dict[str, str], **kw: Any
    ) -> subprocess.Popen[bytes]:
        """Run ``argv`` inside rank ``rank``'s namespace (in a session of its own, so that its
        process group can be ended); it is killed on the way out of the network at the latest."""
        kw.setdefault("start_new_session", True)
        process: subprocess.Popen[bytes] = subprocess.Popen(
            [_tool("ip") or "ip", "netns", "exec", self.names[rank], *argv], env=env, **kw
        )
        self.processes.append(process)
        return process

    def set_link(self, rank: int, up: bool) -> None:
        """Take rank ``rank``'s shaped interface down (cut its cable) or up again."""
        _run("ip", "-n", self.names[rank], "link", "set", "dev", SHAPED, "up" if up else "down")

    def reshape(self, link: LinkShape) -> None:
        """Give every rank's end of the link the shape ``link`` (checked)."""
        qdisc = _qdisc(link, rate_only=not self.emulates_latency)
        for name in self.names:
            _run("tc", "-n", name, "qdisc", "replace", "dev", SHAPED, "root", *qdisc)
            _check_qdisc(name, link, rate_only=not self.emulates_latency)
        self.link = link

    # ---- making and removing ---------------------------------------------------------------

    def _namespace(self, name: str) -> str:
        _run("ip", "netns", "add", name)
        self._made.append(name)
        _run("ip", "-n", name, "link", "set", "dev", "lo", "up")
        return name

    def _build(self, ranks: int, number: int) -> None:
        for name in self.names:
            self._namespace(name)
        if ranks == 2:  # one cable between the two
            peer = ["peer", "name", SHAPED, "netns", self.names[1]]
            _run("ip", "-n", self.names[0], "link", "add", "name", SHAPED, "type", "veth", *peer)
        else:  # a switch: a bridge in a hub namespace, each rank's cable plugged into it
            assert self.hub is not None
            hub = self._namespace(self.hub)
            _run("ip", "-n", hub, "link", "add", "name", "br", "type", "bridge")
            _run("ip", "-n", hub, "link", "set", "dev", "br", "up")
            for rank, name in enumerate(self.names):
                port = f"r{rank}"
                peer = ["peer", "name", SHAPED, "netns", name]
                _run("ip", "-n", hub, "link", "add", "name", port, "type", "veth", *peer)
                _run("ip", "-n", hub, "link", "set", "dev", port, "master", "br", "up")
        for name, ip in zip(self.names, self.ips, strict=True):
            _run("ip", "-n", name, "addr", "add", f"{ip}/24", "dev", SHAPED)
            _run("ip", "-n", name, "link", "set", "dev", SHAPED, "up")
        self.reshape(self.link)
        # The test's own way in: an unshaped veth from the root namespace to rank 0's.
        ours, theirs = _client_addresses(number)
        self.client_url_host = str(theirs)
        peer = ["peer", "name", CLIENT, "netns", self.names[0]]
        _run("ip", "link", "add", "name", self.client_interface, "type", "veth", *peer)
        _run("ip", "addr", "add", f"{ours}/30", "dev", self.client_interface)
        _run("ip", "link", "set", "dev", self.client_interface, "up")
        _run("ip", "-n", self.names[0], "addr", "add", f"{theirs}/30", "dev", CLIENT)
        _run("ip", "-n", self.names[0], "link", "set", "dev", CLIENT, "up")

    def close(self) -> None:
        """Kill every process started in the namespaces, then remove them (and with them their
        veths and qdiscs) and the test's veth. Raises NetnsError if anything is left."""
        for process in self.processes:
            _end(process)
        left = []
        for name in self._made:
            pids = _run("ip", "netns", "pids", name, check=False).stdout.split()
            for pid in pids:  # anything else in our namespace was started by our processes
                with suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            deadline = time.monotonic() + 10
            while _run("ip", "netns", "pids", name, check=False).stdout.split():
                if time.monotonic() > deadline:
                    left.append(f"processes in {name}")
                    break
                time.sleep(0.05)
            if _run("ip", "netns", "del", name, check=False).returncode != 0:
                left.append(f"namespace {name}")
        if _interface_exists(self.client_interface):  # gone with its peer, normally
            _run("ip", "link", "del", "dev", self.client_interface, check=False)
            if _interface_exists(self.client_interface):
                left.append(f"interface {self.client_interface}")
        if left:
            raise NetnsError(f"could not remove: {', '.join(left)}")


def _interface_exists(name: str) -> bool:
    """Whether the root namespace has an interface ``name``."""
    return _run("ip", "link", "show", "dev", name, check=False).returncode == 0


def _end(process: subprocess.Popen[bytes], grace_s: float = 5) -> None:
    """End ``process`` and its process group: SIGTERM, then SIGKILL after ``grace_s``."""
    if process.poll() is None:
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            process.wait(grace_s)
    with suppress(ProcessLookupError, PermissionError):  # what is left of its group, too
        os.killpg(process.pid, signal.SIGKILL)
    with suppress(subprocess.TimeoutExpired):
        process.wait(10)


def _client_addresses(number: int) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]:
    """A /30 of CLIENT_NETS that no address of the root namespace is in (where to look first
    depends on this process and its network ``number``): (ours, rank 0's)."""
    taken = [
        ipaddress.ip_interface(word).network
        for line in _run("ip", "-4", "-o", "addr", "show").stdout.splitlines()
        for word in line.split()[3:4]
    ]
    count = CLIENT_NETS.num_addresses // 4
    start = (os.getpid() * 7919 + number) % count
    for i in range(count):
        base = CLIENT_NETS.network_address + 4 * ((start + i) % count)
        net = ipaddress.IPv4Network(f"{base}/30")
        if not any(net.overlaps(other) for other in taken):
            return base + 1, base + 2
    raise NetnsError(f"no free /30 in {CLIENT_NETS}")


@contextmanager
def ranks_network(ranks: int, link: LinkShape) -> Iterator[Network]:
    """``ranks`` namespaces joined by links shaped like ``link``, rank r at ``SUBNET.{r+1}``;
    everything removed on the way out, also after a failure.

    Raises:
        NetnsError: namespaces cannot be made here (``unavailable()`` says why).
    """
    if ranks < 2:
        raise ValueError("a network has at least two ranks")
    reason = unavailable()
    if reason is not None:
        raise NetnsError(reason)
    number = next(_networks)
    tag = f"mlxs{os.getpid()}n{number}"
    if len(tag) > 15:  # the root namespace's interface is named after it
        raise NetnsError(f"{tag!r} is too long for an interface name")
    network = Network(
        names=[f"{tag}r{rank}" for rank in range(ranks)],
        ips=[f"{SUBNET}.{rank + 1}" for rank in range(ranks)],
        client_url_host="",
        link=link,
        emulates_latency=_probe()[1],
        hub=f"{tag}hub" if ranks > 2 else None,
        client_interface=tag,
    )
    try:
        network._build(ranks, number)
        yield network
    finally:
        network.close()


# ---- mlxserve's ranks on it ------------------------------------------------------------------


def ring_hostfile(network: Network, starting_port: int) -> list[list[str]]:
    """The ring hostfile mlx.launch would give the ranks: rank r at its IP, port
    ``starting_port + r`` (mlx.launch numbers one port per rank and IP)."""
    return [[f"{ip}:{starting_port + rank}"] for rank, ip in enumerate(network.ips)]


def ranks_config(network: Network, tmp: Path, checkpoint: Path, distributed: str = "") -> str:
    """A config serving ``checkpoint`` as model "m" on the ranks of ``network`` (its
    ``[distributed] hosts`` are their IPs); ``distributed`` is appended to that table."""
    return two_ranks_config(tmp, checkpoint, distributed, hosts=network.ips)


@contextmanager
def launch_ranks(
    network: Network,
    tmp: Path,
    text: str,
    extra_env: dict[str, str] | None = None,
    port: int = 8100,
    timeout: float = 120,
) -> Iterator[tuple[str, list[subprocess.Popen[bytes]]]]:
    """Every rank of ``network`` running ``mlxserve serve`` with the config ``text``, started
    as mlx.launch starts a local rank (``MLX_RANK``, and ``MLX_HOSTFILE`` naming the ring
    hostfile), without ssh. ``text``'s ``[distributed] hosts`` must be ``network.ips`` (see
    ``ranks_config``); a ``[server]`` table is added, rank 0 listening on the test's veth at
    ``port``. Rank r's output goes to ``tmp/rank{r}.log``.

    Yields rank 0's URL once healthy and the processes (in rank order); ends them all after
    (SIGTERM, then SIGKILL).
    """
    config_path = tmp / "mlxserve.toml"
    config_path.write_text(
        text + f'\n[server]\nhost = "{network.client_url_host}"\nport = {port}\n'
    )
    config = load_config(config_path, env={})
    if config.distributed.hosts != network.ips:
        raise ValueError(f"[distributed] hosts is {config.distributed.hosts}, not {network.ips}")
    hostfile = tmp / "hostfile.json"
    hostfile.write_text(json.dumps(ring_hostfile(network, config.distributed.starting_port)))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLXSERVE_", "MLX_"))}
    env |= (extra_env or {}) | {"MLX_HOSTFILE": str(hostfile)}
    command = [sys.executable, "-m", "mlxserve.server.cli.main", "--config", str(config_path)]
    processes = []
    for rank in range(len(network.names)):
        with (tmp / f"rank{rank}.log").open("wb") as log:
            processes.append(
                network.popen(
                    rank,
                    [*command, "serve"],
                    env | {"MLX_RANK": str(rank)},
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
    url = f"http://{network.client_url_host}:{port}"
    try:
        try:
            wait_until_healthy(url, processes[0], timeout)
        except AssertionError as exc:
            logs = "\n".join(
                f"--- rank {r}:\n{(tmp / f'rank{r}.log').read_text(errors='replace')[-2500:]}"
                for r in range(len(processes))
            )
            raise AssertionError(f"{exc}\n{logs}") from None
        yield url, processes
    finally:
        _end(processes[0], 20)  # rank 0 tells the others to stop
        for process in processes[1:]:
            _end(process, 10)
