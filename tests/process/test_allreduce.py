"""mlxserve's all-reduce (core/distributed/allreduce.py, core/cpu/native/mesh.cpp) on two real
ranks under mlx.launch on loopback: the same numbers as MLX's ring all_sum, the same bits on
every rank, a clean error (never a hang) when a peer is gone, and MLX's all_sum where the mesh
is turned off."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from mlxserve.core.cpu.qmm import extension

from ..support.processes import run_on_two_ranks

pytestmark = pytest.mark.skipif(
    extension() is None, reason="mlxserve's native extension is not built"
)

PROBE = """
import json, os, sys, time
from mlxserve.core.cpu.startup import prepare_mlx
prepare_mlx()
import mlx.core as mx
from mlxserve.core.distributed.allreduce import connect, mlx_all_sum, route_all_sums
from mlxserve.core.distributed.cluster import Cluster

cluster = Cluster.join()
if sys.argv[2] == "one_refuses" and cluster.rank == 1:
    os.environ["MLXSERVE_MESH"] = "0"  # this rank alone may not join
reduce = connect(cluster, silence_s=5.0)
undo = route_all_sums(reduce)
rank, out = cluster.rank, {"kind": reduce.kind, "reason": reduce.reason, "cases": []}
for dtype in (mx.float32, mx.float16, mx.bfloat16):
    for shape in [(1,), (1, 1, 1024), (3, 7, 64), (600, 1000)]:
        x = (mx.random.normal(shape, key=mx.random.key(rank * 7 + len(shape))) * 50).astype(dtype)
        routed = mx.distributed.all_sum(x, group=cluster.group)  # as the model code calls it
        ring = mlx_all_sum(x, cluster.group)
        both = mx.distributed.all_gather(routed.reshape(1, -1), group=cluster.group)
        out["cases"].append({
            "case": f"{dtype} {shape}",
            "equal_to_ring": bool(mx.array_equal(routed, ring).item()),
            "same_on_ranks": bool(mx.array_equal(both[0], both[1]).item()),
        })
strided = mx.arange(64, dtype=mx.float32).reshape(8, 8).T  # not row-contiguous
out["strided"] = bool(mx.array_equal(reduce.all_sum(strided), strided * 2).item())
undo()
if rank == 1 and sys.argv[2] == "die":
    os._exit(0)  # gone mid-run: rank 0's next all-reduce must fail, not wait
if sys.argv[2] == "die":
    started = time.monotonic()
    try:
        mx.eval(reduce.all_sum(mx.ones((1, 1024))))
        out["after_death"] = "no error"
    except RuntimeError as exc:
        out["after_death"] = str(exc)
    out["seconds"] = time.monotonic() - started
if rank == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(out, f)
"""


def run_two_ranks(tmp_path: Path, mode: str, env_extra: dict[str, str]) -> dict:
    script, verdict = tmp_path / "probe.py", tmp_path / "verdict.json"
    script.write_text(PROBE)
    stderr = run_on_two_ranks([sys.executable, str(script), str(verdict), mode], env_extra, 90)
    assert verdict.exists(), stderr[-3000:]
    return json.loads(verdict.read_text())


def test_the_mesh_sums_as_the_ring_does_with_the_same_bits_everywhere(tmp_path: Path) -> None:
    result = run_two_ranks(tmp_path, "live", {})
    assert result["kind"] == "mesh", result["reason"]
    wrong = [c for c in result["cases"] if not (c["equal_to_ring"] and c["same_on_ranks"])]
    assert not wrong and len(result["cases"]) == 12
    assert result["strided"]


def test_a_peer_gone_mid_run_is_an_error_naming_it_not_a_hang(tmp_path: Path) -> None:
    result = run_two_ranks(tmp_path, "die", {})
    assert result["kind"] == "mesh"
    assert result["after_death"].startswith("[mesh] lost the connection to rank 1")
    assert result["seconds"] < 5.0  # noticed when the socket closes, not at the 5 s silence


def test_mlxserve_mesh_0_keeps_mlx_all_sum(tmp_path: Path) -> None:
    result = run_two_ranks(tmp_path, "live", {"MLXSERVE_MESH": "0"})
    assert result["kind"] == "mlx" and result["reason"] == "MLXSERVE_MESH=0"
    assert all(c["equal_to_ring"] and c["same_on_ranks"] for c in result["cases"])


def test_one_rank_that_cannot_join_keeps_every_rank_on_mlx_all_sum(tmp_path: Path) -> None:
    """Two transports in one group would wait on each other for ever: all agree, or none."""
    result = run_two_ranks(tmp_path, "one_refuses", {})
    assert result["kind"] == "mlx"
    assert result["reason"] == "another rank cannot join the mesh (see its log)"
    assert all(c["equal_to_ring"] and c["same_on_ranks"] for c in result["cases"])
