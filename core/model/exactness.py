"""The exactness check at load: a stage serves only if it computes what mlx-lm computes.

A short probe prompt runs through mlxserve's path — this stage's layers as the layout cuts
them, the family's caches, the prompt in two chunks, a few decode steps, and a left-padded
batch of two as the runner merges them — and through the model's own forward pass with
mlx-lm's own caches (``make_cache``), the whole prompt at once. Outputs (logits on the last
stage, hidden states on the others) must agree within a tolerance relative to the largest
reference value; otherwise loading fails, naming the model type, the step and the first
layer whose output differs. A stage that is not first gets a fixed random hidden state in.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import mlx.core as mx
from mlx.utils import tree_flatten

from mlxserve.core.errors import UnsupportedModelError
from mlxserve.core.kv.batching import end_padding, merge, pad_left
from mlxserve.core.model.layout import LayerCall
from mlxserve.core.model.stages import PipelineStage

log = logging.getLogger(__name__)

PROBE_TOKENS = 40
FIRST_CHUNK = 23
SHORT_ROW = 29
DECODE_STEPS = 3
TOLERANCE = {mx.float32: 1e-3}
HALF_TOLERANCE = 5e-2


class ExactnessError(UnsupportedModelError):
    """The stage's outputs differ from mlx-lm's on the probe: it would serve wrong text."""


@dataclass
class _Run:
    """One way of running the probe: its outputs in order, by step."""

    outputs: list[tuple[str, mx.array]]


def tolerance(dtype: mx.Dtype) -> float:
    """The largest difference accepted, relative to the largest reference value."""
    return TOLERANCE.get(dtype, HALF_TOLERANCE)


def _relative(ours: mx.array, ref: mx.array) -> float:
    ours, ref = ours.astype(mx.float32), ref.astype(mx.float32)
    scale = max(float(cast(float, mx.abs(ref).max().item())), 1e-6)
    return float(cast(float, mx.abs(ours - ref).max().item())) / scale


def _first_array(value: Any) -> mx.array:
    if isinstance(value, mx.array):
        return value
    leaves = cast("list[tuple[str, Any]]", tree_flatten(value))
    return next(v for _, v in leaves if isinstance(v, mx.array))


class _Probe:
    def __init__(
        self, stage: PipelineStage, make_cache: Callable[[], list[Any]], batchable: bool
    ) -> None:
        self.stage, self.layout, self.make_cache = stage, stage.layout, make_cache
        self.batchable = batchable
        vocab = self.layout.vocab_size
        ids = [(i * 7919 + 13) % vocab for i in range(PROBE_TOKENS + DECODE_STEPS)]
        self.tokens = mx.array([ids[:PROBE_TOKENS]])
        self.decode = [mx.array([[t]]) for t in ids[PROBE_TOKENS:]]
        self.hidden: mx.array | None = None
        if not stage.first:
            shape, dtype = self.layout.boundary_shape(mx.zeros((1, len(ids))), stage.layers.start)
            self.hidden = mx.random.normal(shape, key=mx.random.key(7)).astype(dtype)

    def _hidden(self, start: int, stop: int) -> mx.array | None:
        return None if self.hidden is None else self.hidden[:, start:stop]

    def forward(
        self,
        tokens: mx.array,
        cache: Sequence[Any],
        hidden: mx.array | None,
        as_mlx_lm: bool = False,
    ) -> mx.array:
        out = self.layout.forward(
            tokens, cache, self.stage.layers, hidden=hidden, as_mlx_lm=as_mlx_lm
        )
        mx.eval(out)
        return out

    def reference_cache(self) -> list[Any]:
        templates = self.layout.fresh_model_cache()
        if len(self.stage.layers) == self.layout.num_layers:
            return templates
        return [templates[i] for i in self.stage.layers]

    def reference(self) -> _Run:
        cache, steps = self.reference_cache(), [(self.tokens, 0, PROBE_TOKENS, "prefill")]
        steps += [
            (token, PROBE_TOKENS + i, PROBE_TOKENS + i + 1, f"decode step {i + 1}")
            for i, token in enumerate(self.decode)
        ]
        return _Run(
            [
                (name, self.forward(tokens, cache, self._hidden(start, stop), as_mlx_lm=True))
                for tokens, start, stop, name in steps
            ]
        )

    def chunked(self) -> _Run:
        cache = self.make_cache()
        first = self.forward(self.tokens[:, :FIRST_CHUNK], cache, self._hidden(0, FIRST_CHUNK))
        rest = self.forward(
            self.tokens[:, FIRST_CHUNK:], cache, self._hidden(FIRST_CHUNK, PROBE_TOKENS)
        )
        out = [("prefill in two chunks", mx.concatenate([first, rest], axis=1))]
        if self.batchable:  # the runner's decode batch, of one
            cache = [merge([c]) for c in cache]
        for step, token in enumerate(self.decode):
            at = PROBE_TOKENS + step
            out.append(
                (f"decode step {step + 1}", self.forward(token, cache, self._hidden(at, at + 1)))
            )
        return _Run(out)

    def batched(self) -> _Run:
        """The probe beside a shorter prompt, left-padded into one batch (the runner's way)."""
        pad = PROBE_TOKENS - SHORT_ROW
        tokens = mx.concatenate(
            [
                self.tokens,
                mx.concatenate([mx.zeros((1, pad), mx.int32), self.tokens[:, :SHORT_ROW]], 1),
            ]
        )
        hidden = None
        if self.hidden is not None:
            short = self.hidden[:, :SHORT_ROW]
            padded = mx.concatenate([mx.zeros((1, pad, *short.shape[2:]), short.dtype), short], 1)
            hidden = mx.concatenate([self.hidden[:, :PROBE_TOKENS], padded])
        cache = [
            merge(list(layer)) for layer in zip(self.make_cache(), self.make_cache(), strict=True)
        ]
        for layer_cache in cache:
            pad_left(layer_cache, [0, pad])
        prefill = self.forward(tokens, cache, hidden)
        for layer_cache in cache:
            end_padding(layer_cache)
        out = [
            ("batched prefill", prefill[:1]),
            ("batched prefill (left-padded row)", prefill[1:, pad:]),
        ]
        for step, token in enumerate(self.decode):
            at = PROBE_TOKENS + step
            both = mx.concatenate([token, token])
            step_hidden = None
            if self.hidden is not None:
                step_hidden = mx.concatenate([self.hidden[:, at : at + 1]] * 2)
            out.append(
                (f"batched decode step {step + 1}", self.forward(both, cache, step_hidden)[:1])
            )
        return _Run(out)


def _expected(reference: _Run, name: str) -> mx.array:
    by_name = dict(reference.outputs)
    if name.endswith("left-padded row)"):
        return by_name["prefill"][:, :SHORT_ROW]
    if "prefill" in name:
        return by_name["prefill"]
    return by_name[name.removeprefix("batched ")]


def _first_layer_apart(probe: _Probe, limit: float) -> str:
    """Which layer's output first differs, on the first chunk of the probe."""
    layout = probe.layout
    tokens, hidden = probe.tokens[:, :FIRST_CHUNK], probe._hidden(0, FIRST_CHUNK)
    with layout.recording() as ref_calls:
        probe.forward(tokens, probe.reference_cache(), hidden, as_mlx_lm=True)
    with layout.recording() as our_calls:
        probe.forward(tokens, probe.make_cache(), hidden)
    for ref, ours in zip(ref_calls, our_calls, strict=False):
        diff = _layer_diff(ref, ours)
        if diff > limit:
            return f"; layer {ours.index} is the first whose output differs ({diff:.3g})"
    return "; every layer's output agrees on the first chunk (the cache or batch path differs)"


def _layer_diff(ref: LayerCall, ours: LayerCall) -> float:
    a, b = _first_array(ours.hidden_out), _first_array(ref.hidden_out)
    mx.eval(a, b)
    return _relative(a, b) if a.shape == b.shape else float("inf")


def check_stage(
    stage: PipelineStage,
    make_cache: Callable[[], list[Any]],
    *,
    model_type: str,
    batchable: bool = True,
) -> float:
    """Check a loaded stage against mlx-lm (see the module's docstring); the seconds taken.

    Raises:
        ExactnessError: naming the model type, the step and the layer that differ, and by
            how much.
    """
    started = time.perf_counter()
    probe = _Probe(stage, make_cache, batchable)
    where = f"layers {stage.layers.start}-{stage.layers.stop - 1}"
    limit = tolerance(stage.layout.hidden_dtype)
    try:
        reference = probe.reference()
        runs = [probe.chunked(), *([probe.batched()] if batchable else [])]
    except Exception as exc:
        raise ExactnessError(
            f"{model_type}: mlxserve cannot run {where} as mlx-lm does: {type(exc).__name__}: {exc}"
        ) from exc
    for run in runs:
        for name, ours in run.outputs:
            expected = _expected(reference, name)
            diff = _relative(ours, expected) if ours.shape == expected.shape else float("inf")
            if diff > limit:
                layer = _first_layer_apart(probe, limit)
                raise ExactnessError(
                    f"{model_type}: {where} differ from mlx-lm's own forward pass at the "
                    f"{name}: largest difference {diff:.3g} of the largest value, over the "
                    f"tolerance {limit:g}{layer}; it would serve wrong text"
                )
    seconds = time.perf_counter() - started
    log.info("%s: %s give mlx-lm's outputs (checked in %.2f s)", model_type, where, seconds)
    return seconds


def settle_embedding(stage: PipelineStage, make_cache: Callable[[], list[Any]]) -> bool:
    """Give back the embedding to a stage cut without it whose outputs depend on it (a model
    may compute per-layer inputs from the embeddings as well as the first layer's input);
    whether it did (its weights are then read from the checkpoint)."""
    stand_in = stage.layout.unused_embedding()
    if stand_in is None:
        return False
    probe = _Probe(stage, make_cache, batchable=False)
    tokens, hidden = probe.tokens[:, :8], probe._hidden(0, 8)
    outputs = []
    for fill in (0.0, 1.0):
        stand_in.fill = fill
        outputs.append(probe.forward(tokens, make_cache(), hidden))
    stand_in.fill = 0.0
    if mx.array_equal(outputs[0], outputs[1]).item():
        return False
    real = stage.layout.restore_embedding()
    mx.eval(real.parameters())
    log.info("layers %s use the embeddings: this stage keeps them", stage.layers)
    return True
