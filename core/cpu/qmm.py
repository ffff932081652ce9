"""Quantized matmul on the CPU: mlxserve's native kernel where it runs, MLX's own elsewhere.

``quantized_matmul(x, w, scales, biases, group_size=..., bits=...)`` computes
``x @ dequantize(w, scales, biases).T`` for MLX's affine layout. On the CPU, with float32 ``x``,
bits 2, 3, 4, 5, 6 or 8, group size 32, 64 or 128 and float16/bfloat16/float32 scales, it runs
the native MLX primitive of ``mlxserve.core.cpu._qmm`` (core/cpu/native/, built by ``pip
install .`` where a C++ compiler exists): it reads the packed weights once and dequantizes them
in registers. Anything else (another device, dtype, mode or width), or where the extension is
missing, refused or disabled, goes to ``mx.quantized_matmul``, so no input ever gets numbers
the native kernel was not tested for.

The extension is imported on first use, only if the MLX it was built against is the one
running, and after a tiny computation checked against ``mx.dequantize``. Environment:

- ``MLXSERVE_QMM=0`` disables the native kernel (MLX's path everywhere), read at every call.
- ``MLXSERVE_QMM_THREADS=N``: threads a native call is spread over (default: the CPUs this
  process may use), read once, when the first native call starts the thread pool.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from pathlib import Path
from types import ModuleType

import mlx.core as mx

log = logging.getLogger(__name__)

MODULE = "mlxserve.core.cpu._qmm"
BUILD_STATUS = Path(__file__).with_name("_qmm_build.txt")
BITS = frozenset({2, 3, 4, 5, 6, 8})
GROUP_SIZES = frozenset({32, 64, 128})
SCALE_DTYPES = (mx.float16, mx.bfloat16, mx.float32)

_lock = threading.Lock()
_loaded: tuple[ModuleType | None, str | None] | None = None
_logged = False


def disabled() -> bool:
    """Whether ``MLXSERVE_QMM=0`` turns the native kernel off."""
    return os.environ.get("MLXSERVE_QMM", "1").strip().lower() in ("0", "off", "false", "no")


def native_kernel() -> ModuleType | None:
    """The native extension module, or None where it cannot or may not be used."""
    if disabled():
        return None
    return _load()[0]


def extension() -> ModuleType | None:
    """The native extension module where it loaded and passed its check, whether or not the
    quantized matmul is disabled (its other primitive, the mesh all-reduce, is not)."""
    return _load()[0]


def unavailable_reason() -> str | None:
    """Why the native kernel is not used, in one sentence; None when it is."""
    if disabled():
        return "the native quantized matmul is disabled by MLXSERVE_QMM=0"
    return _load()[1]


def describe() -> str:
    """One line for the log: the native kernel's instruction set and threads, or why not."""
    module = native_kernel()
    if module is None:
        return f"quantized matmul: MLX's own ({unavailable_reason()})"
    blas = module.blas_min_rows()
    blas_text = f"BLAS from {blas} rows" if blas else "no BLAS"
    return f"quantized matmul: native ({module.isa()}, {module.threads()} thread(s), {blas_text})"


def supports(
    x: mx.array,
    w: mx.array,
    scales: mx.array,
    biases: mx.array | None,
    *,
    group_size: int,
    bits: int,
    mode: str = "affine",
) -> bool:
    """Whether the native kernel computes this call exactly (else MLX's path is taken)."""
    return (
        mode == "affine"
        and bits in BITS
        and group_size in GROUP_SIZES
        and biases is not None
        and x.dtype == mx.float32
        and x.ndim >= 1
        and w.dtype == mx.uint32
        and w.ndim == 2
        and scales.dtype in SCALE_DTYPES
        and biases.dtype == scales.dtype
        and x.shape[-1] * bits == w.shape[1] * 32
        and x.shape[-1] % group_size == 0
        and scales.shape == (w.shape[0], x.shape[-1] // group_size)
        and biases.shape == scales.shape
        and mx.default_device() == mx.cpu
    )


def quantized_matmul(
    x: mx.array,
    w: mx.array,
    scales: mx.array,
    biases: mx.array | None,
    *,
    group_size: int,
    bits: int,
    mode: str = "affine",
) -> mx.array:
    """``x @ dequantize(w, scales, biases).T``: the native kernel on the CPU where it applies,
    ``mx.quantized_matmul`` otherwise."""
    module = native_kernel()
    if module is None:
        _log_fallback_once()
    elif supports(x, w, scales, biases, group_size=group_size, bits=bits, mode=mode):
        result: mx.array = module.quantized_matmul(
            x, w, scales, biases, group_size=group_size, bits=bits
        )
        return result
    return mx.quantized_matmul(
        x, w, scales, biases, transpose=True, group_size=group_size, bits=bits, mode=mode
    )


def _log_fallback_once() -> None:
    global _logged
    if not _logged:
        _logged = True
        log.warning("%s; using MLX's quantized_matmul on the CPU", unavailable_reason())


def _load() -> tuple[ModuleType | None, str | None]:
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = _import_checked()
        return _loaded


def _import_checked() -> tuple[ModuleType | None, str | None]:
    try:
        module = importlib.import_module(MODULE)
    except ImportError as exc:
        return None, _not_built_reason(exc)
    built_for = str(getattr(module, "mlx_version", "unknown"))
    running = str(getattr(mx, "__version__", "unknown"))  # not in mlx.core's type stubs
    if built_for != running:
        return None, (
            f"the native quantized matmul was built for MLX {built_for} and MLX "
            f"{running} is running (reinstall mlxserve to rebuild it)"
        )
    problem = _self_check(module)
    if problem is not None:
        return None, f"the native quantized matmul failed its check: {problem}"
    return module, None


def _not_built_reason(exc: ImportError) -> str:
    status = BUILD_STATUS.read_text(encoding="utf-8").strip() if BUILD_STATUS.exists() else ""
    if status.startswith("not built: "):
        why = status.removeprefix("not built: ")
        return f"the native quantized matmul was not built at install ({why})"
    if isinstance(exc, ModuleNotFoundError) and exc.name == MODULE:
        return "the native quantized matmul is not built (reinstall mlxserve with a C++ compiler)"
    return f"the native quantized matmul failed to import ({exc})"


def _self_check(module: ModuleType) -> str | None:
    """A tiny product against mx.dequantize: catches a nanobind or ABI mismatch before use."""
    try:
        with mx.stream(mx.cpu):
            key = mx.random.key(0)
            w = mx.random.normal((12, 64), key=key)
            x = mx.random.normal((3, 64), key=mx.random.split(key)[0])
            wq, s, b = mx.quantize(w, group_size=32, bits=4)
            y = module.quantized_matmul(x, wq, s, b, group_size=32, bits=4)
            ref = x @ mx.dequantize(wq, s, b, group_size=32, bits=4).T
            if not mx.allclose(y, ref, rtol=1e-5, atol=1e-5).item():
                return "wrong numbers"
    except TypeError as exc:
        return f"MLX's bindings refuse its arguments ({str(exc).splitlines()[0]})"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None
