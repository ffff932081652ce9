from __future__ import annotations

from pathlib import Path

import pytest

from mlxserve.plugins.family import ModelFamily
from mlxserve.plugins.tiny import write_tiny_checkpoint
from mlxserve.registry.plugins import Plugins, load_plugins

BUILTIN_FAMILIES = ("llama", "qwen", "mistral", "deepseek")


@pytest.fixture(scope="session")
def plugins() -> Plugins:
    return load_plugins()


@pytest.fixture(scope="session")
def builtin_families(plugins: Plugins) -> dict[str, ModelFamily]:
    return {name: plugins.family(name) for name in BUILTIN_FAMILIES}


@pytest.fixture(scope="session")
def tiny_checkpoints(
    tmp_path_factory: pytest.TempPathFactory, builtin_families: dict[str, ModelFamily]
) -> dict[str, Path]:
    """One tiny checkpoint per built-in family (its first model type), written once."""
    root = tmp_path_factory.mktemp("tiny")
    return {
        name: write_tiny_checkpoint(family, root / name)
        for name, family in builtin_families.items()
    }
