"""MLX's other distributed backends, for real: two MPI ranks on loopback (Open MPI's mpirun,
started by ``mlxserve launch``) answer as one rank does; JACCL, which needs macOS 26.2+ and RDMA
over Thunderbolt 5, is refused cleanly here, before launching and when a rank joins."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from ..support.processes import (
    MLXSERVE,
    PROMPTS,
    completion,
    launched,
    rank_pids,
    single_rank_texts,
)
from ..support.server import free_port_run

JACCL = """[distributed]
backend = "jaccl"
hosts = ["127.0.0.1", "127.0.0.1"]
rdma_devices = [["", "rdma_en3"], ["rdma_en3", ""]]
"""
JACCL_REFUSED = (
    'error: [distributed] backend = "jaccl": MLX\'s RDMA backend is not available on this '
    "machine (it needs macOS 26.2+ with RDMA enabled over Thunderbolt 5; see docs/distributed.md)"
)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLXSERVE_", "MLX_"))}
    return {**env, **extra}


@pytest.fixture
def mpi_env() -> dict[str, str]:
    """What the MPI ranks need from the test's environment (mpirun refuses root without it)."""
    if shutil.which("mpirun") is None:
        reason = "mpirun not found: apt-get install openmpi-bin to run the MPI backend's tests"
        if "CI" in os.environ:
            pytest.fail(reason)
        pytest.skip(reason)
    if os.geteuid() == 0:
        return {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    return {}


def mpi_config(tmp: Path, checkpoint: Path, distributed: str) -> str:
    return (
        f'[registry]\ndefault_model = "m"\ncache_dir = "{tmp / "cache"}"\n'
        f'[models.m]\nsource = "{checkpoint}"\n'
        f'[distributed]\nbackend = "mpi"\nhosts = ["127.0.0.1", "127.0.0.1"]\n'
        f"starting_port = {free_port_run()}\n{distributed}"
    )


@pytest.mark.parametrize("strategy", ["pipeline", "tensor"])
def test_two_mpi_ranks_equal_one(
    strategy: str, tmp_path: Path, tiny_checkpoints, mpi_env: dict[str, str]
) -> None:
    expected = single_rank_texts(tmp_path, tiny_checkpoints["llama"])
    text = mpi_config(tmp_path, tiny_checkpoints["llama"], f'strategy = "{strategy}"\n')
    with launched(tmp_path, text, mpi_env) as (url, _):
        placement = httpx.get(url + "/health").json()["placement"]["m"]
        assert placement["strategy"] == strategy
        if strategy == "pipeline":
            assert [s["layers"] for s in placement["stages"]] == [[2, 3], [0, 1]]
        assert [completion(url, p) for p in PROMPTS] == expected


def test_a_killed_mpi_rank_ends_the_group_with_a_failure(
    tmp_path: Path, tiny_checkpoints, mpi_env: dict[str, str]
) -> None:
    """MPI raises nothing when a peer is gone: Open MPI ends the job, and `mlxserve launch`
    exits with mpirun's status, not 0, so that a supervisor starts the group again."""
    text = mpi_config(tmp_path, tiny_checkpoints["llama"], "")
    with launched(tmp_path, text, mpi_env) as (url, process):
        completion(url, PROMPTS[0], max_tokens=2)  # the group serves (a 200)
        [pid] = rank_pids(1, tmp_path, "OMPI_COMM_WORLD_RANK")
        os.kill(pid, signal.SIGKILL)
        assert process.wait(30) != 0
        assert not rank_pids(0, tmp_path, "OMPI_COMM_WORLD_RANK")


def test_launch_refuses_jaccl_where_mlx_has_no_rdma(tmp_path: Path) -> None:
    if os.uname().sysname == "Darwin":
        pytest.skip("a Mac may have RDMA over Thunderbolt")
    (tmp_path / "mlxserve.toml").write_text(JACCL)
    started = time.monotonic()
    done = subprocess.run(
        [MLXSERVE, "launch", "--config", str(tmp_path / "mlxserve.toml")],
        capture_output=True, text=True, timeout=60, env=clean_env(),
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip() == JACCL_REFUSED
    assert "hostfile" not in done.stdout  # refused before anything was written or started
    assert time.monotonic() - started < 30


def test_a_rank_refuses_to_join_with_jaccl_where_mlx_has_no_rdma(tmp_path: Path) -> None:
    """As a rank mlx.launch started would: ``Cluster.join`` refuses before MLX tries."""
    if os.uname().sysname == "Darwin":
        pytest.skip("a Mac may have RDMA over Thunderbolt")
    (tmp_path / "mlxserve.toml").write_text(JACCL + f'[registry]\ncache_dir = "{tmp_path}"\n')
    done = subprocess.run(
        [MLXSERVE, "serve", "--config", str(tmp_path / "mlxserve.toml")],
        capture_output=True, text=True, timeout=60,
        env=clean_env(MLX_RANK="1", MLX_JACCL_COORDINATOR="127.0.0.1:1"),
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert JACCL_REFUSED in done.stderr and "Traceback" not in done.stderr, done.stderr
