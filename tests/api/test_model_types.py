"""Model types: a checkpoint whose model_type no enabled plugin claims is refused with a 422
naming the type (a configuration problem, not a server error)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx

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
