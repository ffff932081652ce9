"""The model store on its own: it removes nothing outside its cache; and the sizes
``mlxserve models`` prints; the tiny checkpoints it names. (The commands themselves:
process/test_models_cli.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlxserve.core.errors import ModelNotFoundError, UnknownModelTypeError
from mlxserve.plugins.tiny import write_tiny_checkpoint
from mlxserve.registry.plugins import Plugins
from mlxserve.registry.store import ModelStatus, ModelStore
from mlxserve.server.cli.models import human_size


def test_store_removes_nothing_outside_its_cache(tmp_path: Path, plugins: Plugins) -> None:
    store = ModelStore(tmp_path / "cache", plugins)
    assert store.remove("builtin:tiny-llama") == 0
    assert store.status("builtin:tiny-llama") == ModelStatus(cached=False)
    with pytest.raises(ModelNotFoundError, match="not a built-in model name"):
        store.remove("builtin:../..")


@pytest.mark.parametrize(
    ("size", "text"),
    [(0, "0 B"), (999, "999 B"), (1000, "1.0 kB"), (12_345_678, "12.3 MB"), (999_999, "1.0 MB")],
)
def test_human_size(size: int, text: str) -> None:
    assert human_size(size) == text


def test_tiny_checkpoints_of_types_only_the_generic_family_serves(
    tmp_path: Path, plugins: Plugins
) -> None:
    store = ModelStore(tmp_path, plugins)
    names = store.builtin_names()
    assert "tiny-gemma3_text" in names and "tiny-qwen3_next" in names
    assert "tiny-*" not in names and "tiny-generic" not in names
    path = store.locate("builtin:tiny-gemma3_text")
    assert json.loads((path / "config.json").read_text())["model_type"] == "gemma3_text"
    with pytest.raises(UnknownModelTypeError, match="serves any model type: name one"):
        write_tiny_checkpoint(plugins.family("generic"), tmp_path / "any")
