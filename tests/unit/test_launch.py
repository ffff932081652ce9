"""``mlxserve launch`` (server/cli/launch.py), without starting ranks: the command for each
backend, what every rank is given, and the refusal of a backend this machine cannot run.
(Ranks started for real: process/test_distributed.py, process/test_distributed_backends.py.)"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from mlxserve.core.config.schema import Config, DistributedConfig
from mlxserve.core.distributed.hostfile import RANK_ZERO_ENV, launch_hostfile
from mlxserve.core.errors import MlxserveError
from mlxserve.server.cli import launch
from mlxserve.server.cli.launch import (
    MPI_LIBRARY_ENV,
    check_backend,
    launch_command,
    open_mpi_library,
    rank_environment,
    run_launch,
)

TWO = ["127.0.0.1", "127.0.0.1"]
SERVE = [sys.executable, "-m", "mlxserve.server.cli.main", "--config", "/srv/m.toml", "serve"]


def config_of(**distributed: object) -> Config:
    return Config(distributed=DistributedConfig(**distributed))


def test_every_rank_is_told_where_rank_zero_hears_heartbeats() -> None:
    config = config_of(hosts=["10.0.0.1", "10.0.0.2"], starting_port=40000)
    env = rank_environment(config, launch_hostfile(config.distributed))
    assert env == {RANK_ZERO_ENV: "10.0.0.1:40000"}
    command = launch_command(config, None, "/tmp/h.json", env)
    assert command[command.index("--env") + 1] == f"{RANK_ZERO_ENV}=10.0.0.1:40000"
    assert command[command.index("--backend") + 1] == "ring"


def test_jaccl_starts_with_mlx_launch_and_its_backend() -> None:
    rdma = [["", "rdma_en3"], ["rdma_en3", ""]]
    config = config_of(backend="jaccl", hosts=TWO, rdma_devices=rdma, workdir="/srv")
    env = rank_environment(config, launch_hostfile(config.distributed))
    command = launch_command(config, "/srv/m.toml", "/tmp/h.json", env)
    assert command[:3] == [sys.executable, "-c", launch.LAUNCHER]
    assert command[3:9] == [
        "--hostfile", "/tmp/h.json", "--backend", "jaccl", "--starting-port", "32323",
    ]  # fmt: skip
    assert command[-len(SERVE) - 1 :] == ["--", *SERVE]
    assert command[command.index("--cwd") + 1] == "/srv"


def test_mpi_starts_with_mpirun_and_the_library_mlx_loads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(MPI_LIBRARY_ENV, "/opt/ompi/lib/libmpi.so.40")
    config = config_of(backend="mpi", hosts=TWO, workdir="/srv")
    hosts = {**launch_hostfile(config.distributed), "envs": ["OMP_NUM_THREADS=2"]}
    env = rank_environment(config, hosts)
    assert env == {
        RANK_ZERO_ENV: "127.0.0.1:32323",
        "OMP_NUM_THREADS": "2",
        MPI_LIBRARY_ENV: "/opt/ompi/lib/libmpi.so.40",
    }
    command = launch_command(config, "/srv/m.toml", "/tmp/h.txt", env)
    assert Path(command[0]).name == "mpirun"
    assert command[1:5] == ["--hostfile", "/tmp/h.txt", "--bind-to", "none"]
    assert [command[i + 1] for i, arg in enumerate(command) if arg == "-x"] == [
        f"{RANK_ZERO_ENV}=127.0.0.1:32323",
        "OMP_NUM_THREADS=2",
        f"{MPI_LIBRARY_ENV}=/opt/ompi/lib/libmpi.so.40",
    ]
    assert command[command.index("--wdir") + 1] == "/srv"
    assert command[-len(SERVE) - 1 :] == ["--", *SERVE]


def test_the_dry_run_of_mpi_shows_mpiruns_hostfile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert run_launch(config_of(backend="mpi", hosts=TWO), None, dry_run=True) == 0
    out = capsys.readouterr().out
    assert "127.0.0.1 slots=2\ncommand: " in out and " --bind-to none " in out


@pytest.mark.skipif(shutil.which("ompi_info") is None, reason="Open MPI is not installed")
def test_the_libmpi_open_mpi_links_is_found() -> None:
    library = open_mpi_library()
    assert library is not None and os.path.isfile(library) and "libmpi." in library


@pytest.mark.skipif(sys.platform == "darwin", reason="a Mac may have RDMA over Thunderbolt")
def test_jaccl_is_refused_where_mlx_has_no_rdma() -> None:
    rdma = [["", "rdma_en3"], ["rdma_en3", ""]]
    for backend in ("jaccl", "jaccl-ring"):
        config = config_of(backend=backend, hosts=TWO, rdma_devices=rdma)
        with pytest.raises(MlxserveError) as info:
            check_backend(config, {})
        assert str(info.value) == (
            f'[distributed] backend = "{backend}": MLX\'s RDMA backend is not available on this '
            "machine (it needs macOS 26.2+ with RDMA enabled over Thunderbolt 5; see "
            "docs/distributed.md)"
        )


def test_mpi_is_refused_without_mpirun(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch.shutil, "which", lambda name: None)
    with pytest.raises(MlxserveError, match="mpirun is not on the PATH; install Open MPI"):
        check_backend(config_of(backend="mpi", hosts=TWO), {})
