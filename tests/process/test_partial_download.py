"""A rank downloads only the safetensors files that hold its own layers (from a fake hub)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from ..support.fake_hub import FakeHub

REPO = "fake-org/sharded-llama"
FILES = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")

LOAD_AS_RANK = """
import json, sys
import mlx.core as mx
from mlxserve.core.config.schema import load_config
from mlxserve.core.distributed.cluster import Cluster
from mlxserve.registry.models import ModelRegistry
from mlxserve.registry.plugins import load_plugins

rank = int(sys.argv[1])
registry = ModelRegistry(load_config(sys.argv[2], env={}), load_plugins(), Cluster(None, rank, 2))
loaded = registry.load("m", download=True)
layers = loaded.stage.layout.layer_modules
owned = [i for i, layer in enumerate(layers) if layer.parameters()]
weight = layers[owned[0]].self_attn.q_proj.weight
print(json.dumps({
    "layers": owned,
    "files": sorted(p.name for p in loaded.path.glob("*.safetensors")),
    "q_proj": weight.tolist()[0][:4],
}))
"""


def shard(checkpoint: Path, dest: Path) -> dict[str, mx.array]:
    """The checkpoint again, its weights cut in two files by layer, with an index."""
    dest.mkdir()
    for item in checkpoint.iterdir():
        if item.suffix != ".safetensors":
            (dest / item.name).write_bytes(item.read_bytes())
    weights = mx.load(str(checkpoint / "model.safetensors"))
    early = {
        k: v
        for k, v in weights.items()
        if k.startswith(("model.embed_tokens", "model.layers.0.", "model.layers.1."))
    }
    late = {k: v for k, v in weights.items() if k not in early}
    weight_map = {}
    for name, part in zip(FILES, (early, late), strict=True):
        mx.save_safetensors(str(dest / name), part, metadata={"format": "mlx"})
        weight_map.update(dict.fromkeys(part, name))
    (dest / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return weights


@pytest.mark.parametrize(("rank", "layers", "file"), [(1, [0, 1], FILES[0]), (0, [2, 3], FILES[1])])
def test_each_rank_downloads_only_its_own_layers(
    tmp_path: Path, tiny_checkpoints: dict[str, Path], rank: int, layers: list[int], file: str
) -> None:
    weights = shard(tiny_checkpoints["llama"], tmp_path / "repo")
    config = tmp_path / "mlxserve.toml"
    config.write_text(
        f'[registry]\ndefault_model = "m"\ncache_dir = "{tmp_path / "cache"}"\n'
        f'[models.m]\nsource = "{REPO}"\n'
        '[distributed]\nhosts = ["127.0.0.1", "127.0.0.1"]\nstrategy = "pipeline"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLXSERVE_", "HF_"))}
    with FakeHub({REPO: tmp_path / "repo"}) as hub:
        env |= {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1"}
        result = subprocess.run(
            [sys.executable, "-c", LOAD_AS_RANK, str(rank), str(config)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        downloads = [r for r in hub.requests if r.endswith(".safetensors")]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["layers"] == layers
    assert loaded["files"] == [file]
    assert downloads and all(file in r for r in downloads), downloads
    expected = weights[f"model.layers.{layers[0]}.self_attn.q_proj.weight"][0, :4]
    assert mx.allclose(mx.array(loaded["q_proj"]), expected).item()
