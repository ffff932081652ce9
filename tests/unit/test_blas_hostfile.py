"""How many ranks share this host, read from mlx.launch's hostfile (either of its shapes): the
BLAS divides the host's cores among them. (The loader itself, in fresh interpreters:
process/test_blas_loader.py.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from mlxserve.core.cpu.blas import ranks_on_this_host

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the loader acts on Linux only")


@pytest.mark.parametrize(
    ("hosts", "rank", "expected"),
    [
        ([["10.0.0.1:5000"], ["10.0.0.2:5001"]], 0, 1),
        ([["10.0.0.1:5000"], ["10.0.0.1:5001"], ["10.0.0.2:5002"]], 1, 2),
        ({"hosts": [{"ssh": "a", "ips": ["10.0.0.1"]}, {"ssh": "b", "ips": ["10.0.0.1"]}]}, 0, 2),
        ("not a hostfile", 0, 1),
    ],
)
def test_ranks_on_this_host_read_from_the_hostfile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hosts: Any, rank: int, expected: int
) -> None:
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps(hosts))
    monkeypatch.setenv("MLX_RANK", str(rank))
    monkeypatch.setenv("MLX_HOSTFILE", str(hostfile))
    assert ranks_on_this_host() == expected


def test_mpirun_says_how_many_ranks_run_on_this_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLX_RANK", raising=False)
    monkeypatch.delenv("MLX_HOSTFILE", raising=False)
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "2")
    assert ranks_on_this_host() == 2
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "")
    assert ranks_on_this_host() == 1
