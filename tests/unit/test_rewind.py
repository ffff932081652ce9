"""Ragged rewinds of a decode batch (core/kv/rewind.py) on real tiny models of every cache kind.

Each scenario prefills prompts of different lengths one by one, merges their caches into a
batch as the runner does, then runs verification-like steps: T tokens a row, a rewind of a
different count per row, sometimes single-token steps between. Every logit the batch gives
for a kept token must equal the logits of the same row's kept tokens run alone, at once.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from mlx_lm.models.cache import ArraysCache, BatchKVCache, BatchRotatingKVCache

from mlxserve.core.kv.batching import merge
from mlxserve.core.kv.caches import KVCacheOptions
from mlxserve.core.kv.quantized import BatchQuantizedCache
from mlxserve.core.kv.rewind import rewind, unrewindable, unrotate
from mlxserve.core.model.loader import load_stage
from mlxserve.core.model.stages import PipelineStage
from mlxserve.registry.plugins import Plugins

ATOL = 1e-4
# Quantizing keys computed by differently shaped passes rounds some of them apart: a row run
# alone differs by up to ~1e-3 even with no rewind (a misplaced or unmasked token: ~0.1).
ATOL_QUANTIZED = 5e-3
VOCAB = 512


@dataclass
class Model:
    stage: PipelineStage
    make: Callable[[], list[Any]]
    atol: float = ATOL

    def forward(self, tokens: list[list[int]], cache: list[Any]) -> mx.array:
        return self.stage.forward(mx.array(tokens), cache)


_loaded: dict[tuple[str, int | None], Model] = {}


def _model(plugins: Plugins, family: str, path: Path, bits: int | None = None) -> Model:
    key = (str(path), bits)
    if key not in _loaded:
        fam = plugins.family(family)
        stage, _ = load_stage(path, fam.model_classes, fam.layout)
        options = KVCacheOptions(bits=bits)
        _loaded[key] = Model(
            stage,
            lambda: fam.make_cache(stage.layout.model, options, list(stage.layers)),
            ATOL if bits is None else ATOL_QUANTIZED,
        )
    return _loaded[key]


@pytest.fixture(scope="module")
def models(
    plugins: Plugins, tiny_checkpoints: dict[str, Path], today_checkpoints: dict[str, Path]
) -> Callable[[str], Model]:
    """A loaded model by case name: ``family`` or ``family/model_type``, ``+q8`` quantized."""

    def get(case: str) -> Model:
        name, _, quant = case.partition("+")
        family, _, model_type = name.partition("/")
        path = today_checkpoints[model_type] if model_type else tiny_checkpoints[family]
        return _model(plugins, family, path, 8 if quant == "q8" else None)

    return get


def _prefilled(model: Model, prompts: list[list[int]]) -> list[Any]:
    """The batch of ``prompts``, each prefilled alone and merged layer by layer."""
    alone = []
    for prompt in prompts:
        cache = model.make()
        mx.eval(model.forward([prompt], cache))
        alone.append(cache)
    return [merge(layer) for layer in zip(*alone, strict=True)]


def _random_tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(2, VOCAB) for _ in range(n)]


class Scenario:
    """A batch and, per row, its kept tokens and the logits the batch gave after each."""

    def __init__(self, model: Model, prompts: list[list[int]], seed: int = 0) -> None:
        self.model, self.rng = model, random.Random(seed)
        self.cache = _prefilled(model, prompts)
        self.kept = [list(p) for p in prompts]
        self.seen: list[dict[int, mx.array]] = [{} for _ in prompts]

    def step(self, width: int, drop: list[int] | None = None) -> None:
        """Feed ``width`` tokens a row, then rewind each row's last ``drop[i]``."""
        drop = drop or [0] * len(self.kept)
        fed = [_random_tokens(self.rng, width) for _ in self.kept]
        if width > 1:
            unrotate(self.cache)
        logits = self.model.forward(fed, self.cache)
        rewind(self.cache, drop)
        mx.eval(logits, [c.state for c in self.cache])
        for row, (tokens, n) in enumerate(zip(fed, drop, strict=True)):
            for j in range(width - n):
                self.kept[row].append(tokens[j])
                self.seen[row][len(self.kept[row]) - 1] = logits[row, j]

    def filter(self, rows: list[int]) -> None:
        for layer_cache in self.cache:
            layer_cache.filter(mx.array(rows))
        self.kept = [self.kept[r] for r in rows]
        self.seen = [self.seen[r] for r in rows]

    def extend(self, prompts: list[list[int]]) -> None:
        for mine, theirs in zip(self.cache, _prefilled(self.model, prompts), strict=True):
            mine.extend(theirs)
        self.kept += [list(p) for p in prompts]
        self.seen += [{} for _ in prompts]

    def check(self) -> None:
        """Every logit seen equals the row's kept tokens run alone."""
        for row, (tokens, seen) in enumerate(zip(self.kept, self.seen, strict=True)):
            truth = self.model.forward([tokens], self.model.make())[0]
            for position, logits in seen.items():
                diff = float(mx.abs(logits - truth[position]).max())
                assert diff <= self.model.atol, (
                    f"row {row}, token {position}: logits differ by {diff:.2e}"
                )


def _prompts(rng: random.Random, lengths: list[int]) -> list[list[int]]:
    return [_random_tokens(rng, n) for n in lengths]


# Every kind that rewinds: full, latent, quantized, chunked (llama4's chunks of 32, and a
# full layer), composite (DeepSeek V3.2's latents and indexer keys), sliding windows of 32
# (mistral) and 16 (gpt_oss's and gemma3's, with full layers).
CASES = [
    "llama",
    "deepseek",
    "llama+q8",
    "llama/llama4",
    "deepseek/deepseek_v32",
    "mistral",
    "gpt_oss/gpt_oss",
    "generic/gemma3_text",
]


@pytest.mark.parametrize("case", CASES)
def test_ragged_rewinds_equal_each_row_alone(models: Callable[[str], Model], case: str) -> None:
    rng = random.Random(1)
    run = Scenario(models(case), _prompts(rng, [3, 11, 20]))
    run.step(5, [4, 0, 2])  # a row rewound to its last token, one keeping all
    run.step(1)
    run.step(4, [1, 3, 0])
    run.step(4, [2, 2, 2])  # equal counts: a plain trim
    run.step(3, [0, 0, 0])
    for _ in range(12):  # past every window and chunk, rotating between verifications
        run.step(4, [rng.randrange(4) for _ in range(3)])
        run.step(1)
    run.step(6, [5, 1, 3])
    run.step(2)
    run.check()


@pytest.mark.parametrize(
    "case", ["llama", "llama+q8", "llama/llama4", "mistral", "gpt_oss/gpt_oss"]
)
def test_filter_and_extend_after_a_rewind(models: Callable[[str], Model], case: str) -> None:
    rng = random.Random(2)
    run = Scenario(models(case), _prompts(rng, [7, 2, 13, 5]), seed=3)
    run.step(4, [3, 0, 1, 2])
    run.filter([0, 2, 3])
    run.step(3, [0, 2, 1])
    run.extend(_prompts(rng, [9, 1]))
    run.step(5, [4, 1, 0, 3, 2])
    run.step(1)
    run.filter([1, 3, 4])
    run.step(3, [1, 0, 2])
    run.extend(_prompts(rng, [30]))
    run.step(2)
    run.check()


@pytest.mark.parametrize("case", ["llama", "deepseek", "llama/llama4", "mistral"])
def test_extract_after_a_rewind_holds_only_the_kept_tokens(
    models: Callable[[str], Model], case: str
) -> None:
    rng = random.Random(4)
    model = models(case)
    run = Scenario(model, _prompts(rng, [6, 15, 10]), seed=5)
    run.step(5, [4, 1, 2])
    run.step(3, [0, 2, 1])
    for row, tokens in enumerate(run.kept):
        extracted = run.cache[0].extract(row)
        alone = model.make()
        model.forward([tokens], alone)
        assert extracted.offset == alone[0].offset == len(tokens)
        mine, theirs = extracted.keys_and_values()[0], alone[0].keys_and_values()[0]
        assert mine.shape == theirs.shape
        assert float(mx.abs(mine - theirs).max()) <= ATOL


def test_zero_counts_change_nothing_and_equal_counts_only_trim(
    models: Callable[[str], Model],
) -> None:
    rng = random.Random(6)
    run = Scenario(models("llama"), _prompts(rng, [4, 9]))
    run.step(4)
    layer = run.cache[0]
    before = (layer.keys, layer.offset, layer.left_padding, layer._idx)
    rewind(run.cache, [0, 0])
    after = (layer.keys, layer.offset, layer.left_padding, layer._idx)
    assert all(a is b for a, b in zip(after, before, strict=True))
    rewind(run.cache, [2, 2])
    assert layer.keys is before[0] and layer.left_padding is before[2]  # no copy
    assert layer._idx == before[3] - 2
    assert layer.offset.tolist() == [n - 2 for n in before[1].tolist()]
    run.step(1)


def test_rows_move_exactly_and_padding_offsets_and_index_agree(
    models: Callable[[str], Model],
) -> None:
    rng = random.Random(7)
    for case, kind in (("llama", BatchKVCache), ("llama+q8", BatchQuantizedCache)):
        model = models(case)
        cache = _prefilled(model, _prompts(rng, [5, 12, 8]))
        model.forward([_random_tokens(rng, 5) for _ in range(3)], cache)
        layer = cache[0]
        assert isinstance(layer, kind)
        parts = layer.keys if isinstance(layer.keys, tuple) else (layer.keys,)
        before = [mx.array(x[..., : layer._idx, :]) for x in parts]
        rewind(cache, [4, 0, 2])
        after = layer.keys if isinstance(layer.keys, tuple) else (layer.keys,)
        for old, new in zip(before, after, strict=True):  # the kept slots, bit for bit
            for row, (start, end) in enumerate([(7, 13), (0, 17), (4, 15)]):
                moved = new[row, :, 17 - (end - start) : 17]
                assert mx.array_equal(moved, old[row, :, start:end]), (case, row)
        assert layer._idx == 12 + 5
        assert layer.left_padding.tolist() == [7 + 4, 0, 4 + 2]
        assert layer.offset.tolist() == [5 + 1, 12 + 5, 8 + 3]
        assert (layer.offset + layer.left_padding).tolist() == [layer._idx] * 3


def test_sliding_windows_refuse_to_drop_what_rotated_away(models: Callable[[str], Model]) -> None:
    rng = random.Random(8)
    run = Scenario(models("gpt_oss/gpt_oss"), _prompts(rng, [20, 3]))
    for _ in range(3):
        run.step(1)  # single-token steps: the buffer holds just the window
    window = next(c for c in run.cache if isinstance(c, BatchRotatingKVCache))
    assert window.rotated
    with pytest.raises(ValueError, match="sliding-window"):
        rewind(run.cache, [2, 0])
    rewind(run.cache, [0, 2])  # the short row is whole: exact
    run.kept[1] = run.kept[1][:-2]
    run.seen[1] = {p: v for p, v in run.seen[1].items() if p < len(run.kept[1])}
    rewind(run.cache, [1, 0])  # one token: the rest of the window is still there
    run.kept[0] = run.kept[0][:-1]
    run.seen[0] = {p: v for p, v in run.seen[0].items() if p < len(run.kept[0])}
    run.step(3, [1, 0])
    run.step(1)
    run.check()


def test_unrewindable_names_recurrent_state(
    models: Callable[[str], Model], plugins: Plugins, today_checkpoints: dict[str, Path]
) -> None:
    for case in CASES:
        assert unrewindable(models(case).make()) == [], case
    recurrent = models("qwen/qwen3_next")
    assert unrewindable(recurrent.make()) == ["recurrent"]
    batch = _prefilled(recurrent, [[5, 6, 7], [8]])
    assert any(isinstance(c, ArraysCache) for c in batch)
    assert unrewindable(batch) == ["recurrent"]
    rewind(batch, [0, 0])
    with pytest.raises(ValueError, match="ArraysCache"):
        rewind(batch, [1, 0])
    own = _model(plugins, "deepseek", today_checkpoints["deepseek_v41"])
    assert unrewindable(own.make()) == ["other"]
    for case in ("llama+q8", "mistral", "deepseek/deepseek_v32"):
        assert unrewindable(_prefilled(models(case), [[3, 4], [5]])) == [], case
