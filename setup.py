"""Builds the optional native extension, mlxserve.core.cpu._qmm (core/cpu/native/), with CMake.

Everything else is in pyproject.toml. Where the extension cannot be built (no C++ compiler, no
CMake, a failing compiler) the install goes on without it: one warning is printed and the
reason is written next to the package (``_qmm_build.txt``), which
``mlxserve.core.cpu.qmm.unavailable_reason()`` reports; MLX's own quantized matmul is used.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "core" / "cpu" / "native"
STATUS_FILE = "_qmm_build.txt"


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class OptionalCMakeBuild(build_ext):
    def run(self) -> None:
        for ext in self.extensions:
            self.build_extension(ext)

    def build_extension(self, ext: Extension) -> None:
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        target.parent.mkdir(parents=True, exist_ok=True)
        status = target.parent / STATUS_FILE
        if os.environ.get("MLXSERVE_BUILD_NATIVE", "1") == "0":
            self._skip(target, status, "MLXSERVE_BUILD_NATIVE=0 at install")
            return
        try:
            built = self._cmake(target.name)
        except Exception as exc:  # any failure: install without the extension
            self._skip(target, status, _reason(exc))
            return
        problem = _smoke_test(built)
        if problem:
            self._skip(target, status, problem)
            return
        shutil.copyfile(built, target)
        status.write_text(f"built {target.name}\n", encoding="utf-8")

    def _cmake(self, name: str) -> Path:
        if shutil.which("cmake") is None:
            raise RuntimeError("CMake was not found")
        build_dir = Path(tempfile.mkdtemp(prefix="mlxserve-qmm-"))
        configure = [
            "cmake",
            "-S",
            str(SOURCE),
            "-B",
            str(build_dir),
            f"-DPython_EXECUTABLE={sys.executable}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", "2")
        for step in (configure, ["cmake", "--build", str(build_dir), "-j", jobs]):
            done = subprocess.run(step, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(_last_error(done.stdout + done.stderr))
        matches = sorted(build_dir.glob("_qmm*" + (sysconfig.get_config_var("SHLIB_SUFFIX") or "")))
        matches = matches or sorted(build_dir.glob("_qmm*.so"))
        if not matches:
            raise RuntimeError(f"CMake built no _qmm module in {build_dir}")
        return matches[0]

    def _skip(self, target: Path, status: Path, reason: str) -> None:
        target.unlink(missing_ok=True)
        status.write_text(f"not built: {reason}\n", encoding="utf-8")
        message = (
            "WARNING: mlxserve's native CPU quantized matmul was not built "
            f"({reason}); mlxserve works without it, using MLX's own quantized matmul."
        )
        print(message, file=sys.stderr, flush=True)


# The built module must take MLX's arrays (same nanobind as MLX's bindings) and compute.
SMOKE_TEST = """
import mlx.core as mx, _qmm
w = mx.random.normal((8, 64))
wq, s, b = mx.quantize(w, group_size=32, bits=4)
x = mx.random.normal((2, 64))
y = _qmm.quantized_matmul(x, wq, s, b, group_size=32, bits=4)
ref = x @ mx.dequantize(wq, s, b, group_size=32, bits=4).T
assert mx.allclose(y, ref, rtol=1e-4, atol=1e-4).item(), "wrong numbers"
"""


def _smoke_test(module: Path) -> str | None:
    # pip's isolated build environment reaches its packages (mlx among them) through
    # PYTHONPATH: the module's folder goes in front of it, not in its place.
    paths = [str(module.parent), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    done = subprocess.run(
        [sys.executable, "-c", SMOKE_TEST], capture_output=True, text=True, env=env
    )
    if done.returncode == 0:
        return None
    lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
    detail = lines[-1] if lines else f"exit status {done.returncode}"
    if "incompatible function arguments" in done.stderr:
        detail = "MLX's bindings refuse its arrays: nanobind differs from MLX's"
    return f"the built module failed its check ({detail[:300]})"


def _last_error(output: str) -> str:
    """The first error line of a failed step, with the line after it."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if "error" in line.lower():
            return " ".join(lines[i : i + 2])[:300]
    return (lines[-1] if lines else "no output")[:300]


def _reason(exc: Exception) -> str:
    return str(exc) or type(exc).__name__


setup(
    ext_modules=[CMakeExtension("mlxserve.core.cpu._qmm")],
    cmdclass={"build_ext": OptionalCMakeBuild},
)
