"""The native CPU quantized matmul (core/cpu/native/, core/cpu/qmm.py) against MLX's own.

Each case compares the native primitive with the float32 matmul of the dequantized weights
(tight) and with ``mx.quantized_matmul`` (looser). The reference dequantizes with float32
scales and biases: ``mx.dequantize`` with float16/bfloat16 scales computes ``scale * q + bias``
in that half precision (even with ``dtype=float32``), while the kernel, like
``mx.quantized_matmul`` on float32 inputs, converts them to float32 first.

Without the extension these tests skip and say why; under CI (``CI`` set, a compiler present)
a missing extension is a failure.
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path
from types import ModuleType

import mlx.core as mx
import pytest

from mlxserve.core.cpu import qmm

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
SCALE_DTYPES = (mx.float16, mx.bfloat16, mx.float32)
ROWS = (*range(1, 17), 17, 33, 100)
TIGHT = 2e-5  # of the largest output magnitude
LOOSE = 1e-3


@pytest.fixture(scope="module")
def native() -> ModuleType:
    module = qmm.native_kernel()
    if module is None:
        reason = qmm.unavailable_reason() or "unknown"
        if os.environ.get("CI"):
            pytest.fail(f"CI has a compiler, yet {reason}")
        pytest.skip(reason)
    return module


def quantized(
    n: int, k: int, group_size: int, bits: int, scale_dtype: mx.Dtype, seed: int = 0
) -> tuple[mx.array, mx.array, mx.array, mx.array]:
    """(w, scales, biases, the float32 dequantized weight) of a random [n, k] matrix."""
    weight = mx.random.normal((n, k), key=mx.random.key(seed))
    w, scales, biases = mx.quantize(weight, group_size=group_size, bits=bits)
    scales, biases = scales.astype(scale_dtype), biases.astype(scale_dtype)
    dense = mx.dequantize(
        w,
        scales.astype(mx.float32),
        biases.astype(mx.float32),
        group_size=group_size,
        bits=bits,
        dtype=mx.float32,
    )
    return w, scales, biases, dense


def relative_error(y: mx.array, ref: mx.array) -> float:
    return (mx.abs(y - ref).max() / (mx.abs(ref).max() + 1e-12)).item()


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_every_row_count_and_scale_dtype(native: ModuleType, bits: int, group_size: int) -> None:
    n, k = 45, 2 * group_size + 128  # N: not a multiple of 8 nor of the threads
    x_all = mx.random.normal((max(ROWS), k), key=mx.random.key(1))
    for scale_dtype in SCALE_DTYPES:
        w, scales, biases, dense = quantized(n, k, group_size, bits, scale_dtype)
        outputs = []
        for m in ROWS:
            x = x_all[:m]
            y = native.quantized_matmul(x, w, scales, biases, group_size=group_size, bits=bits)
            mlx = mx.quantized_matmul(x, w, scales, biases, group_size=group_size, bits=bits)
            outputs.append((m, y, x @ dense.T, mlx))
        mx.eval([o[1:] for o in outputs])
        for m, y, ref, mlx in outputs:
            case = f"bits={bits} group_size={group_size} scales={scale_dtype} M={m}"
            assert y.shape == (m, n) and y.dtype == mx.float32, case
            assert relative_error(y, ref) < TIGHT, case
            assert relative_error(y, mlx) < LOOSE, case


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(
    ("n", "k", "lead"),
    [(1, 64, (1,)), (7, 32, (3,)), (130, 128, (2, 3)), (1000, 512, (4,)), (9, 128, ())],
)
def test_odd_shapes(native: ModuleType, bits: int, n: int, k: int, lead: tuple[int, ...]) -> None:
    """N = 1, K = one group, leading batch dims, a 1-D x, a big enough N to use the threads."""
    group_size = min(k, 64)
    w, scales, biases, dense = quantized(n, k, group_size, bits, mx.float16)
    x = mx.random.normal((*lead, k), key=mx.random.key(2))
    y = native.quantized_matmul(x, w, scales, biases, group_size=group_size, bits=bits)
    assert y.shape == (*lead, n)
    assert relative_error(y, x @ dense.T) < TIGHT


def test_non_contiguous_inputs(native: ModuleType) -> None:
    w, scales, biases, dense = quantized(64, 256, 32, 4, mx.bfloat16)
    x = mx.random.normal((256, 6), key=mx.random.key(3)).T  # transposed: not row-contiguous
    y = native.quantized_matmul(x, w[::2], scales[::2], biases[::2], group_size=32, bits=4)
    assert relative_error(y, x @ dense[::2].T) < TIGHT


def test_many_rows_take_the_blas_route_and_agree(native: ModuleType) -> None:
    """Prefill-sized x (above blas_min_rows) against the fused kernel's own rows."""
    w, scales, biases, dense = quantized(200, 512, 64, 4, mx.float16)
    x = mx.random.normal((300, 512), key=mx.random.key(4))
    y = native.quantized_matmul(x, w, scales, biases, group_size=64, bits=4)
    assert relative_error(y, x @ dense.T) < TIGHT
    rows = mx.concatenate(
        [
            native.quantized_matmul(x[i : i + 8], w, scales, biases, group_size=64, bits=4)
            for i in range(0, 300, 8)
        ]
    )
    assert relative_error(y, rows) < TIGHT


def test_inside_mx_compile(native: ModuleType) -> None:
    w, scales, biases, dense = quantized(96, 256, 64, 5, mx.float32)

    @mx.compile
    def layer(x: mx.array) -> mx.array:
        return mx.maximum(native.quantized_matmul(x, w, scales, biases, group_size=64, bits=5), 0)

    for m in (1, 4, 4, 9):
        x = mx.random.normal((m, 256), key=mx.random.key(m))
        assert relative_error(layer(x), mx.maximum(x @ dense.T, 0)) < TIGHT


def test_concurrent_threads_and_streams(native: ModuleType) -> None:
    """Several threads, each on its own CPU stream, share the pool (or run alone) correctly."""
    w, scales, biases, dense = quantized(777, 1024, 64, 4, mx.float16)
    mx.eval(w, scales, biases, dense)
    failures: list[str] = []

    def worker(index: int) -> None:
        try:
            with mx.stream(mx.new_stream(mx.cpu)):  # MLX's streams belong to their thread
                for step in range(20):
                    m = 1 + (index + step) % 12
                    x = mx.random.normal((m, 1024), key=mx.random.key(100 * index + step))
                    y = native.quantized_matmul(x, w, scales, biases, group_size=64, bits=4)
                    error = relative_error(y, x @ dense.T)
                    if error >= TIGHT:
                        failures.append(f"thread {index} step {step}: {error}")
        except Exception as exc:
            failures.append(f"thread {index}: {exc!r}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures


def test_wrapper_routes_and_kill_switch(
    native: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    w, scales, biases, dense = quantized(40, 128, 32, 4, mx.float16)
    x = mx.random.normal((2, 128), key=mx.random.key(5))
    assert qmm.unavailable_reason() is None
    assert qmm.supports(x, w, scales, biases, group_size=32, bits=4)
    y = qmm.quantized_matmul(x, w, scales, biases, group_size=32, bits=4)
    assert _computed_natively(y)
    assert relative_error(y, x @ dense.T) < TIGHT

    monkeypatch.setenv("MLXSERVE_QMM", "0")
    assert qmm.native_kernel() is None
    assert "MLXSERVE_QMM=0" in (qmm.unavailable_reason() or "")
    y = qmm.quantized_matmul(x, w, scales, biases, group_size=32, bits=4)
    assert not _computed_natively(y)
    assert relative_error(y, x @ dense.T) < LOOSE


def test_wrapper_sends_what_it_cannot_compute_to_mlx(native: ModuleType) -> None:
    w, scales, biases, dense = quantized(40, 128, 32, 4, mx.float16)
    x16 = mx.random.normal((2, 128), key=mx.random.key(6)).astype(mx.float16)
    assert not qmm.supports(x16, w, scales, biases, group_size=32, bits=4)
    y = qmm.quantized_matmul(x16, w, scales, biases, group_size=32, bits=4)
    assert y.dtype == mx.float16 and not _computed_natively(y)
    assert not qmm.supports(x16.astype(mx.float32), w, scales, None, group_size=32, bits=4)
    with pytest.raises(ValueError, match="group_size"):
        native.quantized_matmul(x16.astype(mx.float32), w, scales, biases, group_size=16, bits=8)


def _computed_natively(y: mx.array) -> bool:
    """Whether y, not yet evaluated, is the native primitive's output (its graph's DOT)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "graph.dot"
        mx.export_to_dot(str(path), y)
        return "MlxserveQuantizedMatmulCpu" in path.read_text()
