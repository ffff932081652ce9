"""Cutting a model into pipeline stages: the split plan and one stage's forward pass."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from mlxserve.core.errors import ModelDoesNotFitError
from mlxserve.core.model.layout import DecoderLayout


def split_even(num_layers: int, num_stages: int) -> list[int]:
    """Layer counts per stage, as equal as possible; earlier stages take the remainder."""
    if not 1 <= num_stages <= num_layers:
        raise ValueError(f"cannot cut {num_layers} layers into {num_stages} stages")
    base, extra = divmod(num_layers, num_stages)
    return [base + (1 if i < extra else 0) for i in range(num_stages)]


def split_by_memory(layer_bytes: Sequence[int], free_bytes: Sequence[int]) -> list[int]:
    """Layer counts per stage in proportion to each stage's free memory, at least one each.

    Raises:
        ModelDoesNotFitError: if the layers cannot be placed within the free memory.
    """
    num_layers, num_stages = len(layer_bytes), len(free_bytes)
    if not 1 <= num_stages <= num_layers:
        raise ValueError(f"cannot cut {num_layers} layers into {num_stages} stages")
    total = sum(layer_bytes)
    if total > sum(free_bytes):
        raise ModelDoesNotFitError(
            f"the layers need {total / 2**20:.1f} MiB but the ranks have "
            f"{sum(free_bytes) / 2**20:.1f} MiB free in all"
        )
    cumulative = [0]
    for nbytes in layer_bytes:
        cumulative.append(cumulative[-1] + nbytes)
    counts, start, free_so_far = [], 0, 0
    for stage, free in enumerate(free_bytes):
        free_so_far += free
        target = total * free_so_far / sum(free_bytes)
        last_end = num_layers - (num_stages - stage - 1)
        candidates = range(start + 1, last_end + 1)
        end = (
            last_end
            if stage == num_stages - 1
            else min(candidates, key=lambda e: abs(cumulative[e] - target))
        )
        counts.append(end - start)
        start = end
    for stage, (layers, free) in enumerate(zip(stage_ranges(counts), free_bytes, strict=True)):
        need = sum(layer_bytes[i] for i in layers)
        if need > free:
            raise ModelDoesNotFitError(
                f"rank {stage} would need {need / 2**20:.1f} MiB for layers "
                f"{layers.start}-{layers.stop - 1} but has {free / 2**20:.1f} MiB free"
            )
    return counts


def check_counts(counts: Sequence[int], num_layers: int) -> list[int]:
    """Validate an explicit split given as layer counts per stage."""
    if any(c < 1 for c in counts) or sum(counts) != num_layers:
        raise ValueError(
            f"split {list(counts)} must give each stage at least one layer and sum to "
            f"{num_layers} layers"
        )
    return list(counts)


def stage_ranges(counts: Sequence[int]) -> list[range]:
    ranges, start = [], 0
    for count in counts:
        ranges.append(range(start, start + count))
        start += count
    return ranges


@dataclass
class PipelineStage:
    """One contiguous slice of layers; the first stage embeds, the last one gives logits.

    On several ranks, a stage that is not first receives its input from ``prev_rank`` and
    one that is not last sends its output on to ``next_rank``; with no ranks set, the
    caller passes hidden states between stages itself (``hidden``).
    """

    layout: DecoderLayout
    layers: range
    first: bool
    last: bool
    group: Any = None
    prev_rank: int | None = None
    next_rank: int | None = None

    def forward(
        self, tokens: mx.array, caches: Sequence[Any], hidden: mx.array | None = None
    ) -> mx.array:
        """Run this stage on token ids ``tokens`` (B, L); hidden states or logits out.

        Every stage sees the tokens (a model may build per-layer inputs from them); a stage
        that is not first also takes the previous stage's output: ``hidden``, or received
        from ``prev_rank``. ``caches`` holds this stage's caches, in order.
        """
        if not self.first and hidden is None:
            if self.prev_rank is None:
                raise ValueError("a stage that is not first needs the previous stage's output")
            shape, dtype = self.layout.boundary_shape(tokens, self.layers.start)
            hidden = mx.distributed.recv(shape, dtype, self.prev_rank, group=self.group)
        out = self.layout.forward(tokens, caches, self.layers, hidden=hidden)
        if not self.last and self.next_rank is not None:
            return mx.distributed.send(out, self.next_rank, group=self.group)
        return out

    def input_like(self, tokens: mx.array) -> mx.array | None:
        """A zero hidden state of the shape this stage takes with ``tokens`` (None if first)."""
        if self.first:
            return None
        shape, dtype = self.layout.boundary_shape(tokens, self.layers.start)
        return mx.zeros(shape, dtype)
