"""The hostfile, read in one place (core/distributed/hostfile.py): by the BLAS loader (ranks
sharing this host) and the cluster (rank 0's ring address); and written for mlx.launch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mlxserve.core.config.schema import DistributedConfig
from mlxserve.core.distributed.hostfile import (
    RankHost,
    launch_hostfile,
    rank_zero_address,
    ranks_sharing_host,
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
