"""GGUF files served: a Qwen3 MoE GGUF answers with mlx_lm's greedy tokens of the checkpoint it
was written from; a GGUF the server cannot read, or of an architecture it does not convert, is
answered with a 422 naming the tensor type or the architecture."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import gguf
import httpx
import pytest

from mlxserve.plugins.family import ModelFamily
from mlxserve.plugins.tiny import write_tiny_checkpoint

from ..support.engine import mlx_lm_greedy
from ..support.gguf_files import write_gguf, write_tiny_gguf
from ..support.server import RunningServer, post, running_server, write_config

Q = gguf.GGMLQuantizationType
PROMPT = [5, 9, 77, 120, 33, 8, 250, 19, 42, 7, 99, 3]


@pytest.fixture(scope="module")
def qwen3_moe(
    tmp_path_factory: pytest.TempPathFactory, builtin_families: dict[str, ModelFamily]
) -> Path:
    root = tmp_path_factory.mktemp("qwen3_moe")
    return write_tiny_checkpoint(builtin_families["qwen"], root / "m", model_type="qwen3_moe")


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, tiny_checkpoints: dict[str, Path], qwen3_moe: Path
) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("gguf-served")
    files = {
        "moe": write_gguf(qwen3_moe, tmp / "moe.gguf", "qwen3moe"),
        "odd": write_tiny_gguf(tmp / "odd.gguf", kind=Q.IQ2_XXS),
        "gemma": write_tiny_gguf(tmp / "gemma.gguf", "gemma3", Q.Q8_0),
        "gptoss": write_tiny_gguf(tmp / "gptoss.gguf", "gpt-oss", Q.MXFP4),
    }
    config = write_config(
        tmp,
        f'[registry]\ndefault_model = "tiny"\ncache_dir = "{tmp / "c"}"\nmax_loaded_models = 2\n'
        f'[models.tiny]\nsource = "{tiny_checkpoints["llama"]}"\n'
        + "".join(f'[models.{name}]\nsource = "{path}"\n' for name, path in files.items()),
    )
    with running_server(config) as running:
        yield running


def test_a_qwen3_moe_gguf_gives_mlx_lm_s_greedy_text(
    server: RunningServer, qwen3_moe: Path
) -> None:
    body = {"model": "moe", "prompt": PROMPT, "max_tokens": 20, "temperature": 0}
    response = post(server, "/v1/completions", json=body)
    assert response.status_code == 200, response.text
    text = response.json()["choices"][0]["text"]
    assert text and text == mlx_lm_greedy(qwen3_moe, PROMPT, 20)


def test_the_api_answers_an_unservable_gguf_with_422(server: RunningServer) -> None:
    body = {"model": "odd", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "model_unsupported"
    assert "odd.gguf: mlxserve cannot read GGUF tensor type IQ2_XXS" in error["message"]


@pytest.mark.parametrize(("model", "architecture"), [("gemma", "gemma3"), ("gptoss", "gpt-oss")])
def test_the_api_answers_an_unconverted_architecture_with_422_naming_it(
    server: RunningServer, model: str, architecture: str
) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    response = post(server, "/v1/chat/completions", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "model_unsupported"
    assert (
        f"GGUF architecture {architecture!r} (converted: llama, qwen2, qwen3, qwen3moe)"
        in error["message"]
    )
    messages = post(server, "/v1/messages", json=body)
    assert messages.status_code == 422 and architecture in messages.json()["error"]["message"]
    still = post(server, "/v1/chat/completions", json=body | {"model": "tiny"})
    assert still.status_code == 200, still.text
