"""The type checker passes over the four rooms: mypy, configured by [tool.mypy] in pyproject.toml.

The source tree is the package `mlxserve` only through setuptools' package-dir (core/ is
`mlxserve.core`, ...), which mypy does not follow. So the check builds `mlxserve/` in a
temporary directory from symlinks to the rooms (no __init__.py: `mlxserve` stays a namespace
package, as installed) and runs `mypy --explicit-package-bases mlxserve/core mlxserve/plugins
...` there: the files are named, so an installed copy of mlxserve is never read instead.
The cache stays in .mypy_cache/ at the root: a first run takes about 40 s, the next ones a
few seconds.

Run it alone, with any extra mypy arguments:
    python tests/process/test_type_check.py [--no-incremental]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


def _root() -> Path:
    """The checkout: the nearest parent holding pyproject.toml (the file may move between
    test folders)."""
    for parent in Path(__file__).resolve().parents:
        if (parent / "pyproject.toml").is_file():
            return parent
    raise RuntimeError("no pyproject.toml above " + __file__)


ROOT = _root()


def _rooms() -> dict[str, str]:
    """Package name to folder, as pyproject maps them: {"mlxserve.core": "core", ...}."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return dict(pyproject["tool"]["setuptools"]["package-dir"])


def run_mypy(*extra: str) -> tuple[int, str]:
    """Runs mypy over every room; returns its exit status and its report, with file names
    given as in the source tree (core/engine/engine.py, not mlxserve/core/engine/engine.py)."""
    rooms = _rooms()
    with tempfile.TemporaryDirectory(prefix="mlxserve-types-") as tmp:
        package = Path(tmp, "mlxserve")
        package.mkdir()
        for name, folder in rooms.items():
            os.symlink(ROOT / folder, package / name.split(".", 1)[1], target_is_directory=True)
        command = [
            sys.executable, "-m", "mypy",
            "--config-file", str(ROOT / "pyproject.toml"),
            "--cache-dir", str(ROOT / ".mypy_cache"),
            "--explicit-package-bases",
            *(name.replace(".", "/") for name in rooms),
            *extra,
        ]  # fmt: skip
        done = subprocess.run(command, cwd=tmp, capture_output=True, text=True, timeout=900)
    report = done.stdout + done.stderr
    for name, folder in rooms.items():
        report = report.replace(name.replace(".", "/") + "/", folder + "/")
    return done.returncode, report


def test_mypy_passes_over_core_plugins_registry_and_server() -> None:
    try:
        import mypy  # noqa: F401
    except ImportError:
        pytest.fail("mypy is not installed: pip install '.[test]'")
    status, report = run_mypy()
    if status != 0:
        pytest.fail("mypy found errors:\n" + report, pytrace=False)


if __name__ == "__main__":
    status, report = run_mypy(*sys.argv[1:])
    print(report, end="")
    sys.exit(status)
