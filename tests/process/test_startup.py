"""No work at import time: importing mlxserve loads no BLAS and imports no MLX; the entry points
do both first (core/cpu/startup.py's prepare_mlx). Each case in a fresh interpreter."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ..support.processes import served

ROOT = Path(__file__).resolve().parent.parent.parent
linux_only = pytest.mark.skipif(
    sys.platform != "linux", reason="the BLAS loader acts on Linux only"
)

REPORT = """
import json, os, sys
from mlxserve.core.cpu import blas
print(json.dumps({
    "mlx": sorted(m for m in sys.modules if m.split(".")[0] in ("mlx", "mlx_lm")),
    "blas_loaded": blas._loaded is not None,
    "mapped": blas._mapped_blas()[0],
    "threads_set": [v for v in blas.THREAD_VARIABLES if v in os.environ],
}))
"""


def fresh(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("MLXSERVE_", "MLX_", "MKL_", "OMP_", "OPENBLAS_"))
        and key != "LD_PRELOAD"
    }
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def report(code: str) -> dict[str, Any]:
    result = fresh(code + REPORT)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def has_mkl() -> bool:
    try:
        importlib.metadata.distribution("mkl")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_validating_a_config_imports_no_mlx(tmp_path: Path) -> None:
    config = tmp_path / "mlxserve.toml"
    config.write_text(
        '[registry]\ndefault_model = "m"\n[models.m]\nsource = "builtin:tiny-llama"\n'
        "[server]\nport = 8123\n"
    )
    found = report(
        "import mlxserve.core.config\n"
        "import mlxserve.core.config.schema\n"
        "from mlxserve.core.config.schema import load_config\n"
        f"assert load_config({str(config)!r}).server.port == 8123\n"
        "from mlxserve.server.cli.main import main\n"
        f"assert main(['config', 'check', {str(config)!r}]) == 0\n"
    )
    assert found["mlx"] == []
    assert not found["blas_loaded"]


def test_importing_the_package_does_no_work() -> None:
    found = report(
        "import mlxserve.core, mlxserve.plugins, mlxserve.registry, mlxserve.server\n"
        "import mlxserve.server.cli.main, mlxserve.server.app\n"
    )
    assert not found["blas_loaded"]  # the loader never ran: no BLAS put under MLX ...
    assert found["mapped"] == "bundled"  # ... none mapped
    assert found["threads_set"] == []  # and no thread variables set


@linux_only
def test_importing_mlx_first_is_not_silent() -> None:
    result = fresh(
        "import mlx.core\n"
        "from mlxserve.core.cpu.startup import prepare_mlx\n"
        "info = prepare_mlx()\n"
        "assert info.reason == 'mlx.core was already imported', info\n"
    )
    assert result.returncode == 0, result.stderr
    assert "mlx.core was imported before the BLAS loader ran" in result.stderr


@linux_only
def test_prepare_mlx_loads_the_blas_then_imports_mlx_lm() -> None:
    found = report(
        "from mlxserve.core.cpu.startup import prepare_mlx\n"
        "info = prepare_mlx()\n"
        "assert prepare_mlx() is info\n"
    )
    assert found["blas_loaded"]
    assert "mlx_lm.utils" in found["mlx"]
    if has_mkl():
        assert found["mapped"] == "mkl"


@linux_only
def test_serve_logs_the_blas_line_and_gets_the_fast_blas(
    tmp_path: Path, tiny_checkpoints: dict[str, Path]
) -> None:
    with served(tmp_path, tiny_checkpoints["llama"]) as server:
        maps = Path(f"/proc/{server.process.pid}/maps").read_text()
        log = server.log
    text = log.read_text()
    [line] = [line for line in text.splitlines() if "mlxserve.core.cpu.blas: BLAS " in line]
    assert "already imported" not in text, text
    if has_mkl():
        assert "BLAS mkl (" in line
        assert "libmkl_rt" in maps
