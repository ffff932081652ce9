"""Half-precision and quantized checkpoints compute in float32 on the CPU backend, loaded
in-process: float32 that does not fit keeps the stored dtype, a pipeline stage converts only its
own layers, switch and multi-linear layers dequantize, unknown quantized layers stay.
(Served: api/test_compute_dtype_served.py; on two ranks: process/test_compute_dtype_on_ranks.py.)
"""

from __future__ import annotations

import logging
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.mla import MultiLinear
from mlx_lm.models.switch_layers import SwitchLinear

from mlxserve.core.config.schema import Config, ConfigError
from mlxserve.core.model import dtype as compute_dtype
from mlxserve.registry.models import ModelRegistry
from mlxserve.registry.plugins import Plugins

from ..support.checkpoints import compute_dtype_config, param_dtypes, quantized_modules
from ..support.server import write_config


def test_float32_that_does_not_fit_keeps_the_stored_dtype(
    bf16_checkpoint: Path,
    tmp_path: Path,
    plugins: Plugins,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(compute_dtype, "available_memory", lambda: 2**20)
    with caplog.at_level(logging.INFO, "mlxserve.core.model.dtype"):
        loaded = ModelRegistry(compute_dtype_config(tmp_path, bf16_checkpoint), plugins).load("m")
    assert param_dtypes(loaded.stage.layout.model) == {mx.bfloat16}
    assert loaded.stage.layout.hidden_dtype == mx.bfloat16
    assert "model m: keeping bfloat16: float32 would need" in caplog.text
    assert "1.0 MiB available" in caplog.text


def test_a_pipeline_stage_converts_only_its_own_layers(
    q4_checkpoint: Path, tmp_path: Path, plugins: Plugins, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = ModelRegistry(compute_dtype_config(tmp_path, q4_checkpoint, "float32"), plugins)
    whole = registry.load("m").stage.layout.model
    stage = registry.load("m", layers=range(2, 4), first=False, last=True).stage
    assert stage.layout.hidden_dtype == mx.float32
    assert param_dtypes(stage.layout.model) == {mx.float32}
    assert quantized_modules(stage.layout.model) == []
    assert [m.parameters() for m in stage.layout.layer_modules[:2]] == [{}, {}]
    assert not stage.layout.model.model.embed_tokens.parameters()
    everything = dict(tree_flatten(whole.parameters()))
    mine = dict(tree_flatten(stage.layout.model.parameters()))
    assert all(mx.array_equal(value, everything[key]) for key, value in mine.items())

    stage_bytes = sum(p.nbytes for p in mine.values())
    whole_bytes = sum(p.nbytes for p in everything.values())
    monkeypatch.setattr(compute_dtype, "available_memory", lambda: (stage_bytes + whole_bytes) // 2)
    stage = registry.load("m", layers=range(2, 4), first=False, last=True).stage
    assert param_dtypes(stage.layout.model) == {mx.float32}
    assert quantized_modules(registry.load("m").stage.layout.model)


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
