"""The distribution ships every package of the source tree."""

from __future__ import annotations

import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def test_every_source_package_is_listed_in_pyproject() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(pyproject["tool"]["setuptools"]["packages"])
    found = {
        "mlxserve." + ".".join(init.parent.relative_to(ROOT).parts)
        for top in ("core", "plugins", "registry", "server")
        for init in (ROOT / top).rglob("__init__.py")
    }
    assert found == listed
