"""The distribution ships every package of the source tree, typed (py.typed)."""

from __future__ import annotations

import sys

from ..support import REPO

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


def test_every_source_package_is_listed_in_pyproject() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    listed = set(pyproject["tool"]["setuptools"]["packages"])
    found = {
        "mlxserve." + ".".join(init.parent.relative_to(REPO).parts)
        for top in ("core", "plugins", "registry", "server")
        for init in (REPO / top).rglob("__init__.py")
    }
    assert found == listed


def test_every_room_ships_py_typed() -> None:
    """PEP 561: type checkers read an installed mlxserve's annotations, above all those of
    mlxserve.plugins, the contract a family plugin imports."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    package_dirs = pyproject["tool"]["setuptools"]["package-dir"]
    assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"]["*"]
    for folder in package_dirs.values():
        assert (REPO / folder / "py.typed").is_file(), f"{folder}/py.typed is missing"
