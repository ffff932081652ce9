"""Half-precision and quantized checkpoints, served: the text equals mlx_lm's in float32, and
the served model's weights and KV cache are float32 (or stay quantized when told to)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.utils import dequantize_model, load

from mlxserve.core.cpu.packed import PackedEmbedding, PackedLinear
from mlxserve.core.cpu.qmm import unavailable_reason

from ..support.checkpoints import compute_dtype_config, param_dtypes, quantized_modules
from ..support.processes import PROMPTS
from ..support.server import RunningServer, post, running_server

PROMPT = PROMPTS[0]
MAX_TOKENS = 20


def _mlx_lm_float32_greedy(
    path: Path, prepare: Callable[[nn.Module], object] = lambda m: m
) -> list[int]:
    model, tokenizer = load(str(path))
    model.set_dtype(mx.float32)
    prepare(model)
    assert param_dtypes(model) == {mx.float32}
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


def _served_model(server: RunningServer) -> nn.Module:
    return server.engine.workers["m"].model.stage.layout.model


def _kv_dtypes(server: RunningServer) -> set[mx.Dtype]:
    spec = server.engine.workers["m"].runner.prefix_store.block_spec()
    return {dtype for layer in spec for _, dtype in layer}


def test_bfloat16_checkpoint_computes_in_float32_like_mlx_lm(
    bf16_checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert param_dtypes(load(str(bf16_checkpoint))[0]) == {mx.bfloat16}
    expected = _decode(bf16_checkpoint, _mlx_lm_float32_greedy(bf16_checkpoint))
    logs = caplog.at_level(logging.INFO, "mlxserve.core.model.dtype")
    with logs, running_server(compute_dtype_config(tmp_path, bf16_checkpoint)) as server:
        assert _served_text(server) == expected
        assert param_dtypes(_served_model(server)) == {mx.float32}
        assert _kv_dtypes(server) == {mx.float32}
    assert "model m: computing in float32 (bfloat16 → float32)" in caplog.text


def test_4bit_checkpoint_is_dequantized_like_mlx_lm(
    q4_checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert quantized_modules(load(str(q4_checkpoint))[0])
    expected = _decode(q4_checkpoint, _mlx_lm_float32_greedy(q4_checkpoint, dequantize_model))
    logs = caplog.at_level(logging.INFO, "mlxserve.core.model.dtype")
    config = compute_dtype_config(tmp_path, q4_checkpoint, "float32")
    with logs, running_server(config) as server:
        assert _served_text(server) == expected
        model = _served_model(server)
        assert quantized_modules(model) == []
        assert not any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
        assert param_dtypes(model) == {mx.float32}
        assert _kv_dtypes(server) == {mx.float32}
    assert "bfloat16 → float32, 4-bit layers dequantized" in caplog.text


def test_4bit_checkpoint_stays_packed_and_computes_like_mlx_lm_in_float32(
    q4_checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    if unavailable_reason() is not None:
        pytest.skip(f"the native quantized kernel is off: {unavailable_reason()}")
    reference, _ = load(str(q4_checkpoint))
    reference.set_dtype(mx.float32)
    dequantize_model(reference)
    tokens = mx.array([PROMPT + _mlx_lm_float32_greedy(q4_checkpoint, dequantize_model)])
    expected = reference(tokens)
    logs = caplog.at_level(logging.INFO, "mlxserve.core.model.dtype")
    with logs, running_server(compute_dtype_config(tmp_path, q4_checkpoint)) as server:
        assert _served_text(server)
        model = _served_model(server)
        packed = {type(m) for _, m in model.named_modules() if "scales" in m}
        assert packed == {PackedLinear, PackedEmbedding}
        assert _unpacked_dtypes(model) == {mx.float32}
        assert _kv_dtypes(server) == {mx.float32}
        logits = model(tokens)  # the near-ties of random weights make greedy text fragile
    assert logits.dtype == mx.float32
    error = mx.abs(logits - expected).max().item()
    assert error <= 1e-4 * mx.abs(expected).max().item(), error
    assert "bfloat16 → float32, 4-bit layers kept packed (native CPU kernel)" in caplog.text


def _unpacked_dtypes(model: nn.Module) -> set[mx.Dtype]:
    """The dtypes of the arrays outside the packed layers."""
    return {
        array.dtype
        for _, module in model.named_modules()
        if "scales" not in module
        for array in module.values()
        if isinstance(array, mx.array)
    }


def test_model_setting_keeps_the_checkpoint_quantized(q4_checkpoint: Path, tmp_path: Path) -> None:
    with running_server(compute_dtype_config(tmp_path, q4_checkpoint, "model")) as server:
        assert _served_text(server)
        model = _served_model(server)
        assert any(isinstance(m, nn.QuantizedEmbedding) for _, m in model.named_modules())
        assert any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
        assert _kv_dtypes(server) == {mx.bfloat16}
