"""The BLAS loader, each case in a fresh process: it must run before mlx.core is first imported."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mlxserve.core.cpu.blas import AUTO_THREADS_MARK, THREAD_VARIABLES

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the loader acts on Linux only")

PROBE = """
import json, os, sys
{before}
from mlxserve.core.cpu.blas import cpu_split, load_fast_blas
info = load_fast_blas()
assert load_fast_blas() is info
import mlx.core as mx
import numpy as np
a = np.random.default_rng(0).standard_normal((64, 96), dtype=np.float32)
b = np.random.default_rng(1).standard_normal((96, 32), dtype=np.float32)
product = np.array(mx.array(a) @ mx.array(b))
maps = open("/proc/self/maps").read()
print(json.dumps({{
    "name": info.name, "path": info.path, "threads": info.threads, "reason": info.reason,
    "split": cpu_split(),
    "mkl_mapped": "libmkl_rt" in maps,
    "matmul_ok": bool(np.allclose(product, a @ b, rtol=1e-4, atol=1e-4)),
    "env": {{var: os.environ.get(var) for var in {variables}}},
}}))
"""


def has_mkl() -> bool:
    try:
        importlib.metadata.distribution("mkl")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def probe(before: str = "", **env: str) -> dict[str, Any]:
    clean = {
        key: value
        for key, value in os.environ.items()
        if key not in (*THREAD_VARIABLES, AUTO_THREADS_MARK, "LD_PRELOAD")
        and not key.startswith(("MLXSERVE_BLAS", "MLXSERVE_CPU_SPLIT", "MLX_"))
    }
    code = PROBE.format(before=before, variables=repr(THREAD_VARIABLES))
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def cores() -> int:
    return len(os.sched_getaffinity(0))


@pytest.mark.skipif(not has_mkl(), reason="the mkl wheel is not installed")
def test_the_mkl_wheel_is_found_and_used_by_the_server_cli() -> None:
    found = probe(before="import mlxserve.server.cli.main")
    assert found["name"] == "mkl"
    assert "libmkl_rt" in found["path"]
    assert found["mkl_mapped"]
    assert found["matmul_ok"]
    assert found["threads"] * found["split"] == cores()  # one BLAS thread per stream


@pytest.mark.skipif(cores() < 2, reason="needs two cores to split over")
def test_linear_layers_are_split_over_the_cores_unless_told_otherwise() -> None:
    auto = probe()
    assert (auto["split"], auto["env"]["MKL_NUM_THREADS"]) == (cores(), "1")
    assert "split over" in auto["reason"]
    off = probe(MLXSERVE_CPU_SPLIT="off")
    assert (off["split"], off["env"]["MKL_NUM_THREADS"]) == (1, str(cores()))
    forced = probe(MLXSERVE_CPU_SPLIT="3")
    assert (forced["split"], forced["env"]["MKL_NUM_THREADS"]) == (3, "1")
    operators = probe(MKL_NUM_THREADS="2")  # an operator's BLAS threads: no split
    assert (operators["split"], operators["env"]["MKL_NUM_THREADS"]) == (1, "2")


def test_turned_off_keeps_mlxs_own_blas() -> None:
    off = probe(MLXSERVE_BLAS="off")
    assert off["name"] == "bundled"
    assert off["reason"] == "MLXSERVE_BLAS=off"
    assert not off["mkl_mapped"]
    assert off["matmul_ok"]


def test_a_missing_library_falls_back_and_says_why() -> None:
    missing = probe(MLXSERVE_BLAS="/nonexistent.so")
    assert missing["name"] == "bundled"
    assert "/nonexistent.so" in missing["reason"]
    assert not missing["mkl_mapped"]
    assert missing["matmul_ok"]


def test_nothing_happens_once_mlx_core_was_imported() -> None:
    late = probe(before="import mlx.core")
    assert late["reason"] == "mlx.core was already imported"
    assert late["name"] == "bundled"
    assert not late["mkl_mapped"]
    assert late["env"]["MKL_NUM_THREADS"] is None


def test_one_thread_on_one_core() -> None:
    pinned = probe(before="os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})")
    assert pinned["env"] == dict.fromkeys(THREAD_VARIABLES, "1")
    if pinned["name"] != "bundled":
        assert pinned["threads"] == 1


@pytest.mark.skipif(cores() < 2, reason="needs two cores to share")
def test_two_ranks_on_one_host_share_its_cores(tmp_path: Path) -> None:
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([["127.0.0.1:5000"], ["127.0.0.1:5001"]]))
    ring = probe(MLX_RANK="1", MLX_HOSTFILE=str(hostfile))
    half = cores() // 2
    threads = int(ring["env"]["MKL_NUM_THREADS"])
    assert ring["env"] == dict.fromkeys(THREAD_VARIABLES, str(threads))
    assert threads * ring["split"] == half
    if ring["name"] != "bundled":
        assert ring["threads"] == threads


def test_an_operators_thread_count_is_kept_and_ours_is_not_inherited() -> None:
    operator = probe(OPENBLAS_NUM_THREADS="1")
    assert operator["env"] == dict.fromkeys(THREAD_VARIABLES, "1")
    inherited = probe(
        before="os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})",
        MKL_NUM_THREADS="7",
        OMP_NUM_THREADS="7",
        OPENBLAS_NUM_THREADS="7",
        **{AUTO_THREADS_MARK: "7"},
    )
    assert inherited["env"] == dict.fromkeys(THREAD_VARIABLES, "1")
    override = probe(MLXSERVE_BLAS_THREADS="1", MKL_NUM_THREADS="3")
    assert override["env"] == dict.fromkeys(THREAD_VARIABLES, "1")
