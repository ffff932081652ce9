"""float32 matmul and matvec rates under MLX, with mlxserve's BLAS loader and without it.

Usage:
    python tests/benchmarks/bench_blas.py [--runs 5] [--rows 1024] [--off-rows 128]
        [--settings auto,off] [--env NAME=VALUE ...]

Each setting of MLXSERVE_BLAS runs in a fresh process (the BLAS is chosen before ``mlx.core``
is imported); by default ``auto`` (mlxserve's loader) and ``off`` (MLX's bundled BLAS).
Matmul: rows×4096 @ 4096×4096 (MLX's reference BLAS is so slow that ``off`` gets --off-rows
rows; its rate does not depend on them); matvec: 1×4096 @ 4096×4096, 64 MiB of weights read per
product, 20 products per sample. Medians of --runs samples. --env adds variables to both
processes (e.g. MKL_ENABLE_INSTRUCTIONS=AVX2).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SIZE = 4096
MATVECS_PER_SAMPLE = 20


def measure(rows: int, runs: int) -> dict[str, object]:
    from mlxserve.core.cpu.startup import prepare_mlx

    info = prepare_mlx()
    import mlx.core as mx

    weights = mx.random.normal((SIZE, SIZE))
    activations = mx.random.normal((rows, SIZE))
    vector = mx.random.normal((1, SIZE))
    mx.eval(weights, activations, vector)

    def seconds(compute: object, repeat: int) -> float:
        mx.eval(compute())
        samples = []
        for _ in range(runs):
            start = time.perf_counter()
            for _ in range(repeat):
                mx.eval(compute())
            samples.append((time.perf_counter() - start) / repeat)
        return statistics.median(samples)

    matmul = seconds(lambda: activations @ weights, 1)
    matvec = seconds(lambda: vector @ weights, MATVECS_PER_SAMPLE)
    return {
        "blas": info.describe(),
        "matmul_gflops": 2 * rows * SIZE * SIZE / matmul / 1e9,
        "matvec_gbps": SIZE * SIZE * 4 / matvec / 1e9,
    }


def run_setting(blas: str, rows: int, runs: int, extra_env: dict[str, str]) -> dict[str, object]:
    env = {**os.environ, **extra_env, "MLXSERVE_BLAS": blas}
    command = [sys.executable, __file__, "--inner", "--rows", str(rows), "--runs", str(runs)]
    output = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--off-rows", type=int, default=128)
    parser.add_argument("--settings", default="auto,off", help="MLXSERVE_BLAS values")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        print(json.dumps(measure(args.rows, args.runs)))
        return
    extra_env = dict(item.split("=", 1) for item in args.env)
    load = os.getloadavg()[0]
    print(f"{os.cpu_count()} CPUs, load average {load:.2f} at start; medians of {args.runs}")
    for blas in args.settings.split(","):
        rows = args.off_rows if blas == "off" else args.rows
        result = run_setting(blas, rows, args.runs, extra_env)
        print(
            f"MLXSERVE_BLAS={blas:<8}  matmul {rows}x{SIZE}@{SIZE}x{SIZE} "
            f"{result['matmul_gflops']:7.1f} GFLOP/s  matvec {result['matvec_gbps']:5.1f} GB/s"
            f"  [{result['blas']}]"
        )


if __name__ == "__main__":
    main()
