"""The hostfile, read in one place (core/distributed/hostfile.py): by the BLAS loader (ranks
sharing this host) and the cluster (its rank, rank 0's heartbeat address, whatever the
backend); and written for mlx.launch (ring, JACCL) and mpirun (MPI)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from mlxserve.core.config.schema import DistributedConfig
from mlxserve.core.distributed.hostfile import (
    RANK_ZERO_ENV,
    RankHost,
    heartbeat_address,
    heartbeat_target,
    launch_hostfile,
    launched_rank,
    mpi_hostfile,
    rank_zero_address,
    ranks_sharing_host,
    rdma_names,
    rdma_problems,
    read_hostfile,
)
from mlxserve.core.errors import MlxserveError


def written(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "hosts.json"
    path.write_text(json.dumps(data))
    return path


def test_a_ring_hostfile_gives_each_ranks_ips_and_addresses(tmp_path: Path) -> None:
    hosts = read_hostfile(written(tmp_path, [["10.0.0.1:5000"], ["[::1]:5001", "10.0.0.2:5002"]]))
    assert hosts == [
        RankHost(frozenset({"10.0.0.1"}), (("10.0.0.1", 5000),)),
        RankHost(frozenset({"::1", "10.0.0.2"}), (("::1", 5001), ("10.0.0.2", 5002))),
    ]
    assert rank_zero_address(hosts) == ("10.0.0.1", 5000)


def test_a_launch_hostfile_gives_ips_and_no_ring_address(tmp_path: Path) -> None:
    data = {"backend": "ring", "hosts": [{"ssh": "a", "ips": ["10.0.0.1"]}, {"ips": ["10.0.0.1"]}]}
    hosts = read_hostfile(written(tmp_path, data))
    assert hosts == [RankHost(frozenset({"10.0.0.1"}))] * 2
    assert rank_zero_address(hosts) is None
    assert ranks_sharing_host(hosts, 1) == 2


@pytest.mark.parametrize(
    "data", ["not a hostfile", {"backend": "ring"}, [[1234]], [["no port"]], [{"ssh": "a"}]]
)
def test_what_is_not_a_hostfile_reads_as_none(tmp_path: Path, data: Any) -> None:
    assert read_hostfile(written(tmp_path, data)) is None
    assert ranks_sharing_host(None, 0) == 1 and rank_zero_address(None) is None


def test_no_hostfile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLX_HOSTFILE", raising=False)
    assert read_hostfile() is None
    assert read_hostfile(tmp_path / "missing.json") is None
    monkeypatch.setenv("MLX_HOSTFILE", str(written(tmp_path, [["10.0.0.1:5000"]])))
    assert rank_zero_address(read_hostfile()) == ("10.0.0.1", 5000)


def test_ranks_sharing_a_host_count_this_one_and_ignore_unknown_ranks() -> None:
    hosts = [RankHost(frozenset({"10.0.0.1"})), RankHost(frozenset({"10.0.0.2"}))]
    assert ranks_sharing_host(hosts, 0) == 1
    assert ranks_sharing_host(hosts, 5) == 1


def test_the_launch_hostfile_written_for_mlx_launch() -> None:
    config = DistributedConfig(hosts=["127.0.0.1", "10.0.0.2"], ssh_user="me")
    assert launch_hostfile(config) == {
        "backend": "ring",
        "hosts": [
            {"ssh": "127.0.0.1", "ips": ["127.0.0.1"]},
            {"ssh": "me@10.0.0.2", "ips": ["10.0.0.2"]},
        ],
    }
    with pytest.raises(MlxserveError, match="at least two hosts"):
        launch_hostfile(DistributedConfig(hosts=["127.0.0.1"]))


def test_the_rank_a_launcher_gave() -> None:
    assert launched_rank({}) is None
    assert launched_rank({"MLX_RANK": "2"}) == 2  # mlx.launch: ring, JACCL
    assert launched_rank({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"}) == 1  # mpirun
    assert launched_rank({"MLX_RANK": ""}) is None


def test_the_heartbeat_address_whatever_the_backend(tmp_path: Path) -> None:
    """What `mlxserve launch` gives every rank comes first; else what mlx.launch gives the
    ring's ranks (the hostfile) or JACCL's (the coordinator); mpirun by hand gives nothing."""
    ring = str(written(tmp_path, [["10.0.0.1:5000"], ["10.0.0.2:5001"]]))
    assert heartbeat_address({RANK_ZERO_ENV: "10.0.0.9:7000", "MLX_HOSTFILE": ring}) == (
        "10.0.0.9",
        7000,
    )
    assert heartbeat_address({RANK_ZERO_ENV: "[fd00::1]:7000"}) == ("fd00::1", 7000)
    assert heartbeat_address({"MLX_HOSTFILE": ring}) == ("10.0.0.1", 5000)
    assert heartbeat_address({"MLX_JACCL_COORDINATOR": "192.168.1.2:32323"}) == (
        "192.168.1.2",
        32323,
    )
    assert heartbeat_address({"JACCL_COORDINATOR": "192.168.1.3:1"}) == ("192.168.1.3", 1)
    assert heartbeat_address({"OMPI_COMM_WORLD_RANK": "1"}) is None
    assert heartbeat_address({RANK_ZERO_ENV: "no port", "MLX_JACCL_COORDINATOR": "x:0"}) is None


def test_the_heartbeat_target_is_rank_zeros_first_ip_on_the_starting_port() -> None:
    hosts = {"hosts": [{"ssh": "a", "ips": ["10.0.0.1", "10.0.1.1"]}, {"ssh": "b", "ips": []}]}
    assert heartbeat_target(hosts, 32323) == "10.0.0.1:32323"
    assert heartbeat_target([{"ssh": "a", "ips": ["fd00::1"]}], 5) == "[fd00::1]:5"
    assert heartbeat_target([{"ssh": "me@127.0.0.1", "ips": []}], 5) == "127.0.0.1:5"
    assert heartbeat_target([{"ssh": "no-such-host.invalid", "ips": []}], 5) is None


MESH = [["", "rdma_en3"], ["rdma_en3", ""]]


def test_the_launch_hostfile_of_jaccl_lists_each_hosts_rdma_devices() -> None:
    config = DistributedConfig(
        backend="jaccl", hosts=["127.0.0.1", "10.0.0.2"], rdma_devices=MESH, ssh_user="me"
    )
    assert launch_hostfile(config) == {
        "backend": "jaccl",
        "hosts": [
            {"ssh": "127.0.0.1", "ips": ["127.0.0.1"], "rdma": [None, "rdma_en3"]},
            {"ssh": "me@10.0.0.2", "ips": ["10.0.0.2"], "rdma": ["rdma_en3", None]},
        ],
    }
    two = [["", ["rdma_en3", "rdma_en4"]], [["rdma_en3", "rdma_en4"], ""]]
    config = DistributedConfig(
        backend="jaccl-ring", hosts=["10.0.0.1", "10.0.0.2"], rdma_devices=two
    )
    assert launch_hostfile(config)["hosts"][0]["rdma"] == [None, ["rdma_en3", "rdma_en4"]]


def test_mpirun_gets_each_host_once_with_a_slot_per_rank() -> None:
    hosts = {"hosts": [{"ssh": "127.0.0.1"}, {"ssh": "127.0.0.1"}, {"ssh": "me@b"}]}
    assert mpi_hostfile(hosts) == "127.0.0.1 slots=2\nme@b slots=1\n"


NO_LINK_0_2 = [["", "a", ""], ["a", "", "c"], ["", "c", ""]]
RING_OF_4 = [["", "a", "", "d"], ["a", "", "b", ""], ["", "b", "", "c"], ["d", "", "c", ""]]
UNEVEN_RING = [["", ["a", "b"], ["c", "d"]], [["a", "b"], "", "e"], [["c", "d"], "e", ""]]


@pytest.mark.parametrize(
    ("devices", "ring", "expected"),
    [
        (MESH, False, []),
        ([["", "a", "b"], ["a", "", "c"], ["b", "c", ""]], False, []),
        (NO_LINK_0_2, False, [((0, 2), "no RDMA device from host 0 to host 2: jaccl needs"),
                              ((2, 0), "no RDMA device from host 2 to host 0")]),
        # In a ring of three, each host's neighbours are the other two.
        (NO_LINK_0_2, True, [((0, 2), "no RDMA device from host 0 to host 2: jaccl-ring needs"),
                             ((2, 0), "no RDMA device from host 2 to host 0")]),
        (RING_OF_4, True, []),
        (RING_OF_4, False, [((0, 2), "no RDMA device"), ((1, 3), "no RDMA device"),
                            ((2, 0), "no RDMA device"), ((3, 1), "no RDMA device")]),
        ([["x", "a"], ["a", ""]], False, [((0, 0), "a host has no RDMA device to itself")]),
        ([["", "a"], ["a"]], False, [((1,), "has 1 entries for 2 hosts")]),
        (UNEVEN_RING, True, [((1,), "needs 2 devices to each neighbour, as host 0 has"),
                             ((2,), "needs 2 devices to each neighbour")]),
    ],
)  # fmt: skip
def test_what_jaccl_needs_of_the_rdma_devices(
    devices: list[list[Any]], ring: bool, expected: list[tuple[tuple[int, ...], str]]
) -> None:
    problems = rdma_problems([[rdma_names(e) for e in row] for row in devices], ring)
    assert [at for at, _ in problems] == [at for at, _ in expected]
    for (_, message), (_, start) in zip(problems, expected, strict=True):
        assert message.startswith(start), message


# What mlx.distributed_config --backend jaccl --output-hostfile writes (two Macs, one cable).
DISTRIBUTED_CONFIG = {
    "backend": "jaccl",
    "envs": ["MLX_METAL_FAST_SYNCH=1"],
    "hosts": [
        {"ssh": "mac1", "ips": ["192.168.1.10"], "rdma": [None, "rdma_en3"]},
        {"ssh": "mac2", "ips": ["192.168.1.11"], "rdma": ["rdma_en3", None]},
    ],
}


def test_a_hostfile_from_mlx_distributed_config_is_taken_as_is(tmp_path: Path) -> None:
    path = written(tmp_path, DISTRIBUTED_CONFIG)
    config = DistributedConfig(backend="jaccl", hostfile=path)
    assert launch_hostfile(config) == DISTRIBUTED_CONFIG
    hosts = DistributedConfig(
        backend="jaccl", hostfile=path, hosts=["192.168.1.10", "192.168.1.11"]
    )
    assert launch_hostfile(hosts) == DISTRIBUTED_CONFIG
    assert heartbeat_target(DISTRIBUTED_CONFIG, 32323) == "192.168.1.10:32323"


NO_IPS = [{"ssh": "mac1", "rdma": [None, "x"]}, {"ssh": "mac2", "rdma": ["x", None]}]
NO_LINK = [
    {"ssh": "mac1", "ips": ["1.2.3.4"], "rdma": [None, None]},
    {"ssh": "mac2", "rdma": ["x", None]},
]
NOT_A_DEVICE = [{"ssh": "mac1", "ips": ["1.2.3.4"], "rdma": [None, 3]}, {"ssh": "mac2"}]
RING_WITHOUT_IPS = {"backend": "ring", "hosts": [{"ssh": "a", "ips": ["1.2.3.4"]}, {"ssh": "b"}]}
MPI_APART = {"backend": "mpi", "hosts": [{"ssh": "a"}, {"ssh": "b"}, {"ssh": "a"}]}


@pytest.mark.parametrize(
    ("change", "config", "message"),
    [
        ({}, {"backend": "ring"}, 'is for backend "jaccl" but [distributed] backend = "ring"'),
        ({}, {"hosts": ["a", "b", "c"]}, "lists 2 hosts but [distributed] hosts lists 3"),
        ({}, {"split": [1, 2, 3]}, "[distributed] split has 3 entries for the 2 hosts of"),
        ({"hosts": [DISTRIBUTED_CONFIG["hosts"][0]]}, {}, "lists 1 host(s); launching needs two"),
        ({"hosts": NO_IPS}, {}, "JACCL needs rank 0's \"ips\""),
        ({"hosts": NO_LINK}, {}, '"rdma" of host 0: no RDMA device from host 0 to host 1'),
        ({"hosts": NOT_A_DEVICE}, {}, 'host 0\'s "rdma" must list a device'),
        ({"hosts": [{"ips": ["1.2.3.4"]}, {"ssh": "mac2"}]}, {}, 'host 0 has no "ssh" name'),
        (RING_WITHOUT_IPS, {"backend": "ring"}, 'needs every host\'s "ips" (host 1 has none)'),
        (MPI_APART, {"backend": "mpi"}, "with backend mpi, list a host's ranks next to each"),
    ],
)  # fmt: skip
def test_a_hostfile_that_cannot_serve_the_config_is_refused(
    tmp_path: Path, change: dict[str, Any], config: dict[str, Any], message: str
) -> None:
    path = written(tmp_path, {**DISTRIBUTED_CONFIG, **change})
    settings = DistributedConfig(**{"backend": "jaccl", "hostfile": path, **config})
    with pytest.raises(MlxserveError, match=re.escape(message)):
        launch_hostfile(settings)


def test_a_missing_or_broken_hostfile_is_refused(tmp_path: Path) -> None:
    with pytest.raises(MlxserveError, match="cannot read it"):
        launch_hostfile(DistributedConfig(backend="jaccl", hostfile=tmp_path / "none.json"))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(MlxserveError, match="not JSON"):
        launch_hostfile(DistributedConfig(backend="jaccl", hostfile=tmp_path / "bad.json"))
