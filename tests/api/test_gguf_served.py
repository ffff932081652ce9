"""A GGUF the server cannot read: the API answers a request for it with a 422 naming the tensor
type."""

from __future__ import annotations

from pathlib import Path

import gguf
import httpx

from ..support.gguf_files import write_tiny_gguf
from ..support.server import running_server, write_config

Q = gguf.GGMLQuantizationType


def test_the_api_answers_an_unservable_gguf_with_422(
    tmp_path: Path, tiny_checkpoints: dict[str, Path]
) -> None:
    odd = write_tiny_gguf(tmp_path / "odd.gguf", kind=Q.Q4_K)
    config = write_config(
        tmp_path,
        f'[registry]\ndefault_model = "tiny"\ncache_dir = "{tmp_path / "c"}"\n'
        f'[models.tiny]\nsource = "{tiny_checkpoints["llama"]}"\n'
        f'[models.odd]\nsource = "{odd}"\n',
    )
    body = {"model": "odd", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    with running_server(config) as server:
        response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "model_unsupported"
    assert "odd.gguf: mlxserve cannot read GGUF tensor type Q4_K" in error["message"]
