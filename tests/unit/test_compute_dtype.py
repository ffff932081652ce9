"""Half-precision and quantized checkpoints compute in float32 on the CPU backend."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from mlx_lm.models.mla import MultiLinear
from mlx_lm.models.switch_layers import SwitchLinear
from mlx_lm.utils import dequantize_model, load, quantize_model

from mlxserve.core.config.schema import Config, ConfigError
from mlxserve.core.model import dtype as compute_dtype
from mlxserve.registry.models import ModelRegistry
from mlxserve.registry.plugins import Plugins

from .server import RunningServer, post, running_server, write_config
from .test_distributed import PROMPTS, completion, config_text, launched, single_rank_texts

PROMPT = PROMPTS[0]
MAX_TOKENS = 20


def _copy_with_weights(source: Path, dest: Path, weights: dict, config: dict) -> Path:
    shutil.copytree(source, dest)
    (dest / "model.safetensors").unlink()
    mx.save_safetensors(str(dest / "model.safetensors"), weights, metadata={"format": "mlx"})
    (dest / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return dest


@pytest.fixture(scope="module")
def bf16_checkpoint(
    tiny_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    source = tiny_checkpoints["llama"]
    weights = {
        k: v.astype(mx.bfloat16) for k, v in mx.load(str(source / "model.safetensors")).items()
    }
    config = json.loads((source / "config.json").read_text()) | {"torch_dtype": "bfloat16"}
    return _copy_with_weights(source, tmp_path_factory.mktemp("bf16") / "m", weights, config)


@pytest.fixture(scope="module")
def q4_checkpoint(bf16_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, _ = load(str(bf16_checkpoint))
    config = json.loads((bf16_checkpoint / "config.json").read_text())
    model, config = quantize_model(model, config, group_size=64, bits=4)
    weights = dict(tree_flatten(model.parameters()))
    return _copy_with_weights(bf16_checkpoint, tmp_path_factory.mktemp("q4") / "m", weights, config)


def _config(tmp_path: Path, source: Path, setting: str = "auto") -> Config:
    return write_config(
        tmp_path,
        f"""
[registry]
default_model = "m"
cache_dir = "{tmp_path / "cache"}"
[models.m]
source = "{source}"
[performance]
compute_dtype = "{setting}"
[kv_cache]
max_sequence_length = 256
reserved_memory_mb = 0
""",
    )


def _mlx_lm_float32_greedy(
    path: Path, prepare: Callable[[nn.Module], object] = lambda m: m
) -> list[int]:
    model, tokenizer = load(str(path))
    model.set_dtype(mx.float32)
    prepare(model)
    assert _param_dtypes(model) == {mx.float32}
    tokens = []
    for token, _ in generate_step(
        mx.array(PROMPT), model, max_tokens=MAX_TOKENS, sampler=lambda x: mx.argmax(x, -1)
    ):
        if int(token) in tokenizer.eos_token_ids:
            break
        tokens.append(int(token))
    return tokens


def _served_text(server: RunningServer) -> str:
    body = {"model": "m", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
    response = post(server, "/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def _decode(path: Path, tokens: list[int]) -> str:
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(path).decode(tokens, skip_special_tokens=True)


def _param_dtypes(model: nn.Module) -> set[mx.Dtype]:
    return {p.dtype for _, p in tree_flatten(model.parameters())}


def _quantized_modules(model: nn.Module) -> list[str]:
    return [path for path, m in model.named_modules() if "scales" in m]


def _served_model(server: RunningServer) -> nn.Module:
    return server.engine.workers["m"].model.stage.layout.model


def _kv_dtypes(server: RunningServer) -> set[mx.Dtype]:
    spec = server.engine.workers["m"].runner.block_spec()
    return {dtype for layer in spec for _, dtype in layer}


def test_bfloat16_checkpoint_computes_in_float32_like_mlx_lm(
    bf16_checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert _param_dtypes(load(str(bf16_checkpoint))[0]) == {mx.bfloat16}
    expected = _decode(bf16_checkpoint, _mlx_lm_float32_greedy(bf16_checkpoint))
    logs = caplog.at_level(logging.INFO, "mlxserve.core.model.dtype")
    with logs, running_server(_config(tmp_path, bf16_checkpoint)) as server:
        assert _served_text(server) == expected
        assert _param_dtypes(_served_model(server)) == {mx.float32}
        assert _kv_dtypes(server) == {mx.float32}
    assert "model m: computing in float32 (bfloat16 → float32)" in caplog.text


def test_4bit_checkpoint_is_dequantized_like_mlx_lm(
    q4_checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert _quantized_modules(load(str(q4_checkpoint))[0])
    expected = _decode(q4_checkpoint, _mlx_lm_float32_greedy(q4_checkpoint, dequantize_model))
    logs = caplog.at_level(logging.INFO, "mlxserve.core.model.dtype")
    with logs, running_server(_config(tmp_path, q4_checkpoint)) as server:
        assert _served_text(server) == expected
        model = _served_model(server)
        assert _quantized_modules(model) == []
        assert not any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
        assert _param_dtypes(model) == {mx.float32}
        assert _kv_dtypes(server) == {mx.float32}
    assert "bfloat16 → float32, 4-bit layers dequantized" in caplog.text


def test_model_setting_keeps_the_checkpoint_quantized(q4_checkpoint: Path, tmp_path: Path) -> None:
    with running_server(_config(tmp_path, q4_checkpoint, "model")) as server:
        assert _served_text(server)
        model = _served_model(server)
        assert any(isinstance(m, nn.QuantizedEmbedding) for _, m in model.named_modules())
        assert any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
        assert _kv_dtypes(server) == {mx.bfloat16}


def test_float32_that_does_not_fit_keeps_the_stored_dtype(
    bf16_checkpoint: Path,
    tmp_path: Path,
    plugins: Plugins,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(compute_dtype, "available_memory", lambda: 2**20)
    with caplog.at_level(logging.INFO, "mlxserve.core.model.dtype"):
        loaded = ModelRegistry(_config(tmp_path, bf16_checkpoint), plugins).load("m")
    assert _param_dtypes(loaded.stage.layout.model) == {mx.bfloat16}
    assert loaded.stage.layout.hidden_dtype == mx.bfloat16
    assert "model m: keeping bfloat16: float32 would need" in caplog.text
    assert "1.0 MiB available" in caplog.text


def test_a_pipeline_stage_converts_only_its_own_layers(
    q4_checkpoint: Path, tmp_path: Path, plugins: Plugins, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = ModelRegistry(_config(tmp_path, q4_checkpoint, "float32"), plugins)
    whole = registry.load("m").stage.layout.model
    stage = registry.load("m", layers=range(2, 4), first=False, last=True).stage
    assert stage.layout.hidden_dtype == mx.float32
    assert _param_dtypes(stage.layout.model) == {mx.float32}
    assert _quantized_modules(stage.layout.model) == []
    assert stage.layout.layer_modules[:2] == [None, None]
    assert stage.layout.model.model.embed_tokens is None
    everything = dict(tree_flatten(whole.parameters()))
    mine = dict(tree_flatten(stage.layout.model.parameters()))
    assert all(mx.array_equal(value, everything[key]) for key, value in mine.items())

    stage_bytes = sum(p.nbytes for p in mine.values())
    whole_bytes = sum(p.nbytes for p in everything.values())
    monkeypatch.setattr(compute_dtype, "available_memory", lambda: (stage_bytes + whole_bytes) // 2)
    stage = registry.load("m", layers=range(2, 4), first=False, last=True).stage
    assert _param_dtypes(stage.layout.model) == {mx.float32}
    assert _quantized_modules(registry.load("m").stage.layout.model)


def test_switch_and_multi_linear_layers_dequantize() -> None:
    class Experts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.switch = SwitchLinear(64, 32, 4, bias=True)
            self.multi = MultiLinear(64, 16, 2)

    model = Experts()
    model.switch = model.switch.to_quantized(group_size=32, bits=4)
    model.multi = model.multi.to_quantized(group_size=32, bits=8)
    expected = {
        name: mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits)
        for name, m in (("switch", model.switch), ("multi", model.multi))
    }
    assert compute_dtype.to_float32(model) == []
    assert isinstance(model.switch, SwitchLinear) and isinstance(model.multi, MultiLinear)
    assert mx.array_equal(model.switch.weight, expected["switch"])
    assert mx.array_equal(model.multi.weight, expected["multi"])
    assert "bias" in model.switch


def test_unknown_quantized_layers_stay_quantized() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight, self.scales, self.biases = mx.quantize(mx.ones((8, 64)), 64, 4)
            self.bits = 4

    model = nn.Sequential(Odd(), nn.Linear(4, 4))
    model.set_dtype(mx.bfloat16)
    assert compute_dtype.to_float32(model) == ["layers.0"]
    assert model.layers[1].weight.dtype == mx.float32


def test_config_validation_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        write_config(tmp_path, '[performance]\ncompute_dtype = "float16"\n')
    assert "performance.compute_dtype" in str(info.value)
    assert Config().performance.compute_dtype == "auto"


@pytest.mark.parametrize("strategy", ["pipeline", "tensor"])
def test_ranks_agree_on_float32_and_equal_one_rank(
    q4_checkpoint: Path, tmp_path: Path, strategy: str
) -> None:
    expected = single_rank_texts(tmp_path, q4_checkpoint)
    text = config_text(tmp_path, q4_checkpoint, f'strategy = "{strategy}"\n')
    with launched(tmp_path, text) as (url, process):
        assert [completion(url, p) for p in PROMPTS] == expected
    assert process.stdout is not None
    lines = [line for line in process.stdout.read().splitlines() if "computing in float32" in line]
    assert len(lines) == 2, lines
