"""The model registry and store: names, aliases, sources, and loading one stage."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from mlxserve.core.config.schema import load_config
from mlxserve.core.errors import ModelNotFoundError, UnknownModelTypeError
from mlxserve.core.kv.caches import KVCacheOptions
from mlxserve.registry.models import ModelRegistry
from mlxserve.registry.plugins import load_plugins


def make_registry(tmp_path: Path, models: str, **plugin_args: object) -> ModelRegistry:
    toml = tmp_path / "mlxserve.toml"
    default = models.split("]", 1)[0].split(".", 1)[1]
    toml.write_text(
        f'[registry]\ndefault_model = "{default}"\ncache_dir = "{tmp_path / "cache"}"\n{models}'
    )
    return ModelRegistry(load_config(toml, env={}), load_plugins(**plugin_args))


def test_resolves_names_and_aliases(tmp_path: Path) -> None:
    registry = make_registry(
        tmp_path, '[models.demo]\nsource = "builtin:tiny-llama"\naliases = ["d", "tiny"]\n'
    )
    assert registry.config.resolve_model("tiny")[0] == "demo"
    assert registry.config.resolve_model("demo")[1].source == "builtin:tiny-llama"
    with pytest.raises(
        ModelNotFoundError, match=r"model 'gpt-4' does not exist \(available: demo\)"
    ):
        registry.load("gpt-4")


def test_builtin_is_written_once_and_reused(tmp_path: Path) -> None:
    registry = make_registry(tmp_path, '[models.q]\nsource = "builtin:tiny-qwen3_moe"\n')
    path = registry.checkpoint("q")
    assert path == tmp_path / "cache" / "builtin" / "tiny-qwen3_moe"
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert registry.checkpoint("q") == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert registry.family_of("q", path).name == "qwen"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]


def test_unknown_builtin_lists_the_known_ones(tmp_path: Path) -> None:
    registry = make_registry(tmp_path, '[models.x]\nsource = "builtin:tiny-falcon"\n')
    with pytest.raises(ModelNotFoundError, match="builtin:tiny-llama"):
        registry.checkpoint("x")


def test_local_folder_must_hold_a_checkpoint(tmp_path: Path) -> None:
    registry = make_registry(tmp_path, f'[models.x]\nsource = "{tmp_path}"\n')
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        registry.checkpoint("x")


def test_hub_model_not_cached_points_to_pull(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    registry = make_registry(tmp_path, '[models.x]\nsource = "someone/nothing-here"\n')
    with pytest.raises(ModelNotFoundError, match="mlxserve models pull"):
        registry.store.hub("someone/nothing-here", download=False)


def test_entry_family_overrides_model_type(tmp_path: Path, tiny_checkpoints) -> None:
    registry = make_registry(
        tmp_path, f'[models.x]\nsource = "{tiny_checkpoints["llama"]}"\nfamily = "mistral"\n'
    )
    assert registry.family_of("x", tiny_checkpoints["llama"]).name == "mistral"
    registry = make_registry(
        tmp_path, f'[models.x]\nsource = "{tiny_checkpoints["llama"]}"\nfamily = "falcon"\n'
    )
    with pytest.raises(UnknownModelTypeError, match="'falcon'"):
        registry.family_of("x", tiny_checkpoints["llama"])


def test_disabled_family_is_refused(tmp_path: Path, tiny_checkpoints) -> None:
    registry = make_registry(
        tmp_path, f'[models.x]\nsource = "{tiny_checkpoints["qwen"]}"\n', enabled=["llama"]
    )
    with pytest.raises(UnknownModelTypeError, match="'qwen3'"):
        registry.load("x")


def test_a_stage_holds_only_its_own_weights(tmp_path: Path, tiny_checkpoints) -> None:
    registry = make_registry(tmp_path, f'[models.x]\nsource = "{tiny_checkpoints["llama"]}"\n')
    whole = registry.load("x")
    last = registry.load("x", layers=range(2, 4), first=False, last=True)
    names = {name for name, _ in tree_flatten(last.stage.layout.model.parameters())}
    assert not any(n.startswith(("model.layers.0.", "model.layers.1.")) for n in names)
    assert not any(n.startswith("model.embed_tokens") for n in names)
    assert any(n.startswith("lm_head") for n in names)
    assert any(n.startswith("model.layers.3.") for n in names)
    nbytes = sum(p.nbytes for _, p in tree_flatten(last.stage.layout.model.parameters()))
    total = sum(p.nbytes for _, p in tree_flatten(whole.stage.layout.model.parameters()))
    assert nbytes < total * 0.75
    tokens = mx.array([[1, 2, 3, 4, 5]])
    first = registry.load("x", layers=range(0, 2), first=True, last=False)
    h = first.stage.forward(tokens, first.make_cache(KVCacheOptions()))
    assert mx.allclose(
        last.stage.forward(tokens, last.make_cache(KVCacheOptions()), hidden=h),
        whole.stage.forward(tokens, whole.make_cache(KVCacheOptions())),
        atol=1e-5,
    )
