"""The native CPU quantized matmul against MLX's own and against float32 BLAS.

Usage:
    python tests/benchmarks/bench_qmm.py [--runs 7] [--rows 1,2,4,8,16,64,512]
        [--shapes demo,2b] [--bits 4] [--group-size 32] [--out FILE.md]

For each layer shape (N output features × K inputs) and each row count M, in one process
after ``prepare_mlx()`` (mkl under MLX, as in production), it times four ways to compute
``x @ dequantize(w).T`` with float32 x: the native primitive (``mlxserve.core.cpu._qmm``, its
fused kernel below ``blas_min_rows`` rows and dequantized tiles plus the BLAS sgemm from
there), the native primitive forced onto the other route (``fused``/``tiles+BLAS``), MLX's
``mx.quantized_matmul``, a float32 matmul of the weights dequantized beforehand (what
mlxserve did on the CPU before: 5x the bytes at 4 bits), and ``mx.dequantize`` in float32
then that matmul, per call (the Python-side alternative for prefill). The methods run
interleaved, each sample a batch of calls evaluated together (as a model's step queues
them), medians of --runs samples. GB/s is the quantized weight bytes (packed weights,
scales and biases) over the time; the float32 column's bytes are its own float32 weights.
Each call reads the next of enough copies of the layer (96 MiB of them) that its weights
come from memory, as a model's do, not from the last-level cache. MLX's quantized matmul is
slow on the CPU: once a call of it takes over a second it is timed once.

Shapes: ``demo`` is SmolLM2-135M's (hidden 576, intermediate 1536, 9 heads of 64 with 3 KV
heads, vocabulary 49152), ``2b`` a 1-2B model's MLP (2048 and 8192). 4-bit, group size 32,
float16 scales by default, as the demo checkpoint.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Callable
from typing import Any

SHAPES = {
    "demo": [
        ("q/o proj", 576, 576),
        ("k/v proj", 192, 576),
        ("gate/up", 1536, 576),
        ("down", 576, 1536),
        ("lm head", 49152, 576),
    ],
    "2b": [("up 2048->8192", 8192, 2048), ("down 8192->2048", 2048, 8192)],
}
# At most this many bytes of calls a sample (small layers: many calls a sample).
SAMPLE_BYTES = 64 * 2**20
SAMPLE_SECONDS = 0.1
# Weights cycled through per layer shape: more than the last-level cache (32 MiB here).
COLD_BYTES = 96 * 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--rows", default="1,2,4,8,16,64,512")
    parser.add_argument("--shapes", default="demo,2b")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument(
        "--mlx-max-rows",
        type=int,
        default=64,
        help="MLX's quantized matmul only up to this many rows (it is slow)",
    )
    parser.add_argument("--out", help="also write the table as Markdown to this file")
    args = parser.parse_args()

    from mlxserve.core.cpu.startup import prepare_mlx

    blas = prepare_mlx()
    import mlx.core as mx

    from mlxserve.core.cpu import qmm

    native = qmm.native_kernel()
    if native is None:
        raise SystemExit(f"no native kernel: {qmm.unavailable_reason()}")
    default_blas_rows = native.blas_min_rows()
    header = f"{blas.describe()}\n{qmm.describe()}"
    print(header)
    rows_list = [int(r) for r in args.rows.split(",")]
    lines = [
        "| layer (N×K) | M | native ms | GB/s | fused ms | tiles+BLAS ms | MLX qmm ms "
        "| float32 BLAS ms | f32 GB/s | mx.dequantize+f32 ms | native vs MLX | native vs f32 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    print("\n".join(lines))
    for shape in args.shapes.split(","):
        for name, n, k in SHAPES[shape]:
            # Enough copies of the layer that a sample's weights never sit in the last-level
            # cache (a model's weights do not): each call reads the next copy.
            layers = []
            for copy in range(max(1, -(-COLD_BYTES // (n * k * args.bits // 8)))):
                w = mx.random.normal((n, k), key=mx.random.key(copy))
                wq, scales, biases = mx.quantize(w, group_size=args.group_size, bits=args.bits)
                layers.append((wq, scales.astype(mx.float16), biases.astype(mx.float16)))
                mx.eval(layers[-1])
            denses = [
                mx.dequantize(
                    wq,
                    s.astype(mx.float32),
                    b.astype(mx.float32),
                    group_size=args.group_size,
                    bits=args.bits,
                )
                for wq, s, b in layers[: max(1, -(-COLD_BYTES // (n * k * 4)))]
            ]
            mx.eval(denses)
            wq, scales, biases = layers[0]
            qbytes = wq.nbytes + scales.nbytes + biases.nbytes
            kw: dict[str, Any] = {"group_size": args.group_size, "bits": args.bits}
            for m in rows_list:
                x = mx.random.normal((m, k), key=mx.random.key(m))
                mx.eval(x)

                methods = methods_for(mx, native, layers, denses, x, kw, default_blas_rows)
                if m > args.mlx_max_rows:
                    del methods["mlx"]
                times = measure(mx, methods, qbytes, args.runs)
                native.set_blas_min_rows(default_blas_rows)
                mlx_ms = f"{times['mlx'] * 1e3:.3f}" if "mlx" in times else "-"
                mlx_ratio = f"{times['mlx'] / times['native']:.1f}x" if "mlx" in times else "-"
                row = (
                    f"| {name} ({n}×{k}) | {m} | {times['native'] * 1e3:.3f} "
                    f"| {qbytes / times['native'] / 1e9:.1f} | {times['fused'] * 1e3:.3f} "
                    f"| {times['tiles'] * 1e3:.3f} | {mlx_ms} "
                    f"| {times['f32'] * 1e3:.3f} | {n * k * 4 / times['f32'] / 1e9:.1f} "
                    f"| {times['deq'] * 1e3:.3f} "
                    f"| {mlx_ratio} "
                    f"| {times['f32'] / times['native']:.2f}x |"
                )
                print(row, flush=True)
                lines.append(row)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as out:
            out.write(header.replace("\n", "  \n") + "\n\n" + "\n".join(lines) + "\n")


def methods_for(
    mx: Any,
    native: Any,
    layers: list[Any],
    denses: list[Any],
    x: Any,
    kw: dict[str, Any],
    default_blas_rows: int,
) -> dict[str, Callable[[], Any]]:
    """The ways to compute one product, each call on the next copy of the layer."""
    turn = itertools.count()

    def with_blas_rows(rows: int) -> Callable[[], Any]:
        def call() -> Any:
            native.set_blas_min_rows(rows)
            w, s, b = layers[next(turn) % len(layers)]
            return native.quantized_matmul(x, w, s, b, **kw)

        return call

    def mlx_qmm() -> Any:
        w, s, b = layers[next(turn) % len(layers)]
        return mx.quantized_matmul(x, w, s, b, **kw)

    def float32() -> Any:
        return x @ denses[next(turn) % len(denses)].T

    def dequantize_then_float32() -> Any:
        w, s, b = layers[next(turn) % len(layers)]
        return x @ mx.dequantize(w, s, b, dtype=mx.float32, **kw).T

    return {
        "native": with_blas_rows(default_blas_rows),
        "fused": with_blas_rows(0),
        "tiles": with_blas_rows(1),
        "mlx": mlx_qmm,
        "f32": float32,
        "deq": dequantize_then_float32,
    }


def measure(
    mx: Any, methods: dict[str, Callable[[], Any]], qbytes: int, runs: int
) -> dict[str, float]:
    """Median seconds a call of each method, interleaved sample by sample."""
    batch = max(1, min(200, SAMPLE_BYTES // qbytes))
    samples: dict[str, list[float]] = {name: [] for name in methods}
    slow: set[str] = set()
    for _ in range(runs):
        for name, call in methods.items():
            if name in slow:
                continue
            start = time.perf_counter()
            mx.eval(call())  # warm (the pool, the caches, the route just set), and a guess
            guess = time.perf_counter() - start
            # Samples of about SAMPLE_SECONDS.
            last = samples[name][-1] if samples[name] else guess
            calls = max(1, min(batch, int(SAMPLE_SECONDS / max(last, 1e-6))))
            if guess > 1.0:
                samples[name].append(guess)
                slow.add(name)
                continue
            start = time.perf_counter()
            mx.eval([call() for _ in range(calls)])
            samples[name].append((time.perf_counter() - start) / calls)
    return {name: statistics.median(values) for name, values in samples.items()}


if __name__ == "__main__":
    main()
