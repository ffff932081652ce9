"""The native quantized matmul's build and its fallbacks, in real builds and fresh processes.

- A build where the C++ compiler fails still produces a working mlxserve: the wheel has no
  extension, says why (``_qmm_build.txt``), prints one warning, and ``quantized_matmul`` gives
  MLX's answer with one log line.
- The portable (non-SIMD) kernels, forced with ``MLXSERVE_QMM_ISA=scalar``, compute right.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ..support import REPO

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="builds on Linux")

SOURCES = ("core", "plugins", "registry", "server")
TOP_FILES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md")

FALLBACK_PROBE = """
import json, logging, io
from mlxserve.core.cpu.startup import prepare_mlx
prepare_mlx()
import mlx.core as mx
from mlxserve.core.cpu import qmm
stream = io.StringIO()
logging.basicConfig(stream=stream, level=logging.INFO, format="%(name)s %(message)s")
w = mx.random.normal((40, 128), key=mx.random.key(0))
wq, s, b = mx.quantize(w, group_size=32, bits=4)
x = mx.random.normal((3, 128), key=mx.random.key(1))
ys = [qmm.quantized_matmul(x, wq, s, b, group_size=32, bits=4) for _ in range(3)]
mlx = mx.quantized_matmul(x, wq, s, b, group_size=32, bits=4)
print(json.dumps({
    "file": qmm.__file__,
    "native": qmm.native_kernel() is not None,
    "reason": qmm.unavailable_reason(),
    "equal": all(mx.array_equal(y, mlx).item() for y in ys),
    "log": [line for line in stream.getvalue().splitlines() if "qmm" in line],
}))
"""

SCALAR_PROBE = """
from mlxserve.core.cpu.startup import prepare_mlx
prepare_mlx()
import mlx.core as mx
from mlxserve.core.cpu import qmm
native = qmm.native_kernel()
assert native is not None, qmm.unavailable_reason()
assert native.isa() == "scalar", native.isa()
worst = 0.0
for bits in (2, 3, 4, 5, 6, 8):
    for group_size in (32, 64, 128):
        for dtype in (mx.float16, mx.bfloat16, mx.float32):
            w = mx.random.normal((37, 256), key=mx.random.key(bits))
            wq, s, b = mx.quantize(w, group_size=group_size, bits=bits)
            s, b = s.astype(dtype), b.astype(dtype)
            dense = mx.dequantize(wq, s.astype(mx.float32), b.astype(mx.float32),
                                  group_size=group_size, bits=bits)
            for m in (1, 3, 6, 40):
                x = mx.random.normal((m, 256), key=mx.random.key(m))
                y = native.quantized_matmul(x, wq, s, b, group_size=group_size, bits=bits)
                ref = x @ dense.T
                worst = max(worst, (mx.abs(y - ref).max() / mx.abs(ref).max()).item())
print(worst)
"""


def _copy_source(destination: Path) -> None:
    for name in SOURCES:
        shutil.copytree(
            REPO / name,
            destination / name,
            ignore=shutil.ignore_patterns("__pycache__", "_qmm*.so", "_qmm_build.txt"),
        )
    for name in TOP_FILES:
        shutil.copy2(REPO / name, destination / name)


def test_a_build_without_a_working_compiler_installs_and_falls_back(tmp_path: Path) -> None:
    source = tmp_path / "src"
    _copy_source(source)
    failing = tmp_path / "failing-c++"
    failing.write_text("#!/bin/sh\necho 'this compiler always fails' >&2\nexit 1\n")
    failing.chmod(0o755)
    env = {**os.environ, "CXX": str(failing), "CC": str(failing)}
    wheels = tmp_path / "wheels"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-v", "-w", str(wheels), str(source)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    output = built.stdout + built.stderr
    warnings = [line for line in output.splitlines() if "quantized matmul was not built" in line]
    assert len(warnings) == 1, output[-3000:]
    (wheel,) = wheels.glob("mlxserve-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        assert not [name for name in names if "/_qmm" in name and name.endswith(".so")]
        status = archive.read("mlxserve/core/cpu/_qmm_build.txt").decode()
        assert status.startswith("not built: ")
        archive.extractall(tmp_path / "installed")

    probe = subprocess.run(
        [sys.executable, "-c", FALLBACK_PROBE],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(tmp_path / "installed")},
        cwd=tmp_path,
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    result = json.loads(probe.stdout.strip().splitlines()[-1])
    assert result["file"].startswith(str(tmp_path / "installed")), result["file"]
    assert not result["native"]
    assert result["reason"].startswith("the native quantized matmul was not built at install")
    assert result["equal"]
    assert len(result["log"]) == 1 and "using MLX's quantized_matmul" in result["log"][0]


def test_the_portable_kernels_compute_right() -> None:
    probe = subprocess.run(
        [sys.executable, "-c", SCALAR_PROBE],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "MLXSERVE_QMM_ISA": "scalar"},
    )
    if probe.returncode != 0 and "not built" in probe.stderr and not os.environ.get("CI"):
        pytest.skip(probe.stderr.strip().splitlines()[-1])
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert float(probe.stdout.strip()) < 2e-5
