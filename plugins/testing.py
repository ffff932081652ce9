"""The plugin author kit: checks any family must pass, on its own tiny checkpoint.

Use from pytest in a plugin's own tests::

    from mlxserve.plugins.testing import check_family

    def test_my_family(tmp_path):
        check_family(MyFamily(), tmp_path)

Each check raises AssertionError with a message that says what differs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm.utils import load_model

from mlxserve.core.kv_cache import KVCacheOptions
from mlxserve.core.loader import load_stage
from mlxserve.core.pipeline import PipelineStage, split_even, stage_ranges

from .family import ModelFamily
from .tiny import write_tiny_checkpoint

PROMPT = [3, 17, 42, 7, 99, 5, 61, 23, 11, 8, 150, 77, 19, 4, 200, 31, 2, 90, 13, 66] * 3
ATOL = 1e-4


def _tokens(n: int = len(PROMPT)) -> mx.array:
    return mx.array([PROMPT[:n]])


def _assert_close(actual: mx.array, expected: mx.array, what: str, atol: float = ATOL) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    diff = mx.abs(actual.astype(mx.float32) - expected.astype(mx.float32)).max().item()
    assert diff <= atol, f"{what}: logits differ by up to {diff:.2e} (allowed {atol:.0e})"


def _load(
    family: ModelFamily,
    path: Path,
    layers: range | None = None,
    first: bool = True,
    last: bool = True,
) -> PipelineStage:
    stage, _ = load_stage(
        path, family.model_classes, family.layout, layers=layers, first=first, last=last
    )
    return stage


def _fresh_cache(family: ModelFamily, stage: PipelineStage, bits: int | None = None) -> list[Any]:
    options = KVCacheOptions(bits=bits)
    return family.make_cache(stage.layout.model, options, list(stage.layers))


def check_loads(family: ModelFamily, path: Path) -> None:
    """The checkpoint loads, and the layout's forward pass equals the model's own ``__call__``."""
    stage = _load(family, path)
    ours = stage.forward(_tokens(), [None] * len(stage.layers))
    reference, _ = load_model(path, get_model_classes=family.model_classes)
    _assert_close(ours, reference(_tokens()), "layout forward vs the model's own forward")
    assert ours.shape[-1] == stage.layout.model.args.vocab_size, "logits are not vocab-sized"


def check_kv_cache(family: ModelFamily, path: Path, bits: int | None = None) -> None:
    """Prefill then decode one token at a time with the family's caches equals no cache.

    The prompt is longer than a tiny model's sliding window, so windowed caches rotate.
    With ``bits`` the cache is quantized and the check only bounds the error loosely.
    """
    stage = _load(family, path)
    tokens = _tokens()
    full = stage.forward(tokens, [None] * len(stage.layers))
    cache = _fresh_cache(family, stage, bits)
    split = tokens.shape[1] - 4
    steps = [stage.forward(tokens[:, :split], cache)[:, -1:]]
    for i in range(split, tokens.shape[1] - 1):
        steps.append(stage.forward(tokens[:, i : i + 1], cache))
    cached = mx.concatenate(steps, axis=1)
    expected = full[:, split - 1 : tokens.shape[1] - 1]
    _assert_close(
        cached, expected, f"cached decode (bits={bits})", atol=ATOL * 10 if bits is None else 0.5
    )


def check_pipeline_split(family: ModelFamily, path: Path, num_stages: int = 2) -> None:
    """Stages that each load only their own layers, run in turn, give the unsplit logits."""
    whole = _load(family, path)
    tokens = _tokens()
    expected = whole.forward(tokens, [None] * len(whole.layers))
    ranges = stage_ranges(split_even(whole.layout.num_layers, num_stages))
    h = tokens
    for i, layers in enumerate(ranges):
        stage = _load(family, path, layers, first=i == 0, last=i == len(ranges) - 1)
        present = [j for j, m in enumerate(stage.layout.layer_modules) if m is not None]
        assert present == list(layers), f"stage {i} kept layers {present}, not {list(layers)}"
        h = stage.forward(h, _fresh_cache(family, stage))
    _assert_close(h, expected, f"{num_stages}-stage pipeline vs unsplit")


def check_family(family: ModelFamily, tmp_path: Path, model_types: list[str] | None = None) -> None:
    """Every check, on a tiny checkpoint of each of the family's model types."""
    for model_type in model_types or list(family.model_types):
        path = write_tiny_checkpoint(family, Path(tmp_path) / model_type, model_type=model_type)
        check_loads(family, path)
        check_kv_cache(family, path)
        check_pipeline_split(family, path)
        weights = family.layer_weights(_load(family, path).layout.model)
        assert len(weights) > 1 and all(w > 0 for w in weights), f"layer weights {weights}"
