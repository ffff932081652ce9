"""Model types: a checkpoint whose model_type no enabled plugin claims is refused with a 422
naming the type (a configuration problem, not a server error); so is one mlxserve would serve
wrong (the exactness check at load)."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import mlx.core as mx
from mlx_lm.models.base import create_attention_mask

from mlxserve.core.model.layout import DecoderLayout
from mlxserve.plugins import hookimpl
from mlxserve.registry.plugins import load_plugins

from ..support.server import running_server, write_config


def test_an_unclaimed_model_type_is_a_422_naming_it(
    tmp_path: Path, tiny_checkpoints: dict[str, Path]
) -> None:
    checkpoint = tmp_path / "unclaimed"
    shutil.copytree(tiny_checkpoints["llama"], checkpoint)
    config_file = checkpoint / "config.json"
    config_json = json.loads(config_file.read_text())
    config_file.write_text(json.dumps(config_json | {"model_type": "falcon_h9"}))
    config = write_config(
        tmp_path,
        f'[registry]\ndefault_model = "llama"\ncache_dir = "{tmp_path / "cache"}"\n'
        f'max_loaded_models = 2\n[models.llama]\nsource = "{tiny_checkpoints["llama"]}"\n'
        f'[models.odd]\nsource = "{checkpoint}"\n',
    )
    body = {"model": "odd", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with running_server(config) as server:
        chat = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
        messages = httpx.post(server.url + "/v1/messages", json=body, timeout=60)
        still = httpx.post(
            server.url + "/v1/chat/completions", json=body | {"model": "llama"}, timeout=60
        )
    assert chat.status_code == 422, chat.text
    error = chat.json()["error"]
    assert error["code"] == "model_unsupported" and "falcon_h9" in error["message"]
    assert messages.status_code == 422 and "falcon_h9" in messages.text
    assert messages.json()["type"] == "error"
    assert still.status_code == 200


def test_a_model_mlxserve_would_serve_wrong_is_a_422_at_load(
    tmp_path: Path, today_checkpoints: dict[str, Path]
) -> None:
    """A plugin's sharding rule that runs Gemma 3 without its embedding scale: the exactness
    check at load refuses it, naming the type, the step and the first layer that differs; the
    same checkpoint with the default rule serves."""

    class DropsTheScale:
        @hookimpl
        def mlxserve_sharding_rule(self, family, model):  # noqa: ANN001, ANN201
            return UnscaledGemma3(model)

    checkpoint = today_checkpoints["gemma3_text"]
    config = write_config(
        tmp_path,
        f'[registry]\ndefault_model = "g"\ncache_dir = "{tmp_path / "cache"}"\n'
        f'[models.g]\nsource = "{checkpoint}"\n',
    )
    body = {"model": "g", "prompt": [5, 6, 7], "max_tokens": 2}
    plugins = load_plugins(extra=[("drops-the-scale", DropsTheScale())])
    with running_server(config, plugins) as server:
        refused = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert refused.status_code == 422, refused.text
    error = refused.json()["error"]
    assert error["code"] == "model_unsupported"
    assert re.search(
        r"gemma3_text: layers 0-3 differ from mlx-lm's .* layer 0 is the first", error["message"]
    )
    with running_server(config) as server:
        assert httpx.post(server.url + "/v1/completions", json=body, timeout=60).status_code == 200


class UnscaledGemma3(DecoderLayout):
    """Gemma 3's forward pass written out by hand, without its embedding scale."""

    def run(self, tokens: mx.array, cache: Sequence[Any]) -> mx.array:
        inner = self.model.model
        h = inner.embed_tokens(tokens)
        full = create_attention_mask(h, cache[1])
        window = create_attention_mask(h, cache[0], window_size=inner.window_size)
        for layer, layer_cache in zip(inner.layers, cache, strict=True):
            h = layer(h, window if layer.self_attn.is_sliding else full, layer_cache)
        return inner.embed_tokens.as_linear(inner.norm(h))  # tied
