"""Linear layers computed on several CPU streams at once, each with a single-threaded BLAS.

On the CPU backend a decode step is a string of small-M matmuls (one row per running
sequence). Multi-threaded BLAS libraries split those poorly: on the 2-core development
machine mkl's two threads ran a (8 x 1024) @ (1024 x 2816) matmul in 1.24 ms, while two MLX
CPU streams with one BLAS thread each, every stream computing half of the output features,
took 0.77 ms (one row: 0.56 → 0.41 ms, 28 GB/s). So on the CPU, each ``nn.Linear`` of a loaded
model is cut by output features into as many parts as the cores its process gets (see
``blas.cpu_split``), and each part runs on its own stream; the parts are views of the stored
weight, so no memory is added. A small layer is left whole: its parts would wait on each
other's streams longer than they compute (``MIN_SPLIT_ELEMENTS``, measured in
docs/performance.md).
"""

from __future__ import annotations

import threading

import mlx.core as mx
import mlx.nn as nn

# The smallest weight (output x input features) split over the streams; below it, one stream
# with one BLAS thread computes the layer faster than two streams and their synchronization.
MIN_SPLIT_ELEMENTS = 1 << 20

_local = threading.local()


def _streams(ways: int) -> tuple[mx.Stream, ...]:
    """This thread's CPU streams (MLX streams belong to the thread that made them)."""
    streams = getattr(_local, "streams", {})
    if ways not in streams:
        _local.streams = streams
        streams[ways] = tuple(mx.new_stream(mx.cpu) for _ in range(ways))
    return streams[ways]


class ParallelLinear(nn.Module):
    """``nn.Linear`` whose output features are computed in ``ways`` parts, one per CPU stream."""

    def __init__(self, linear: nn.Linear, ways: int) -> None:
        super().__init__()
        rows = linear.weight.shape[0]
        bounds = [rows * i // ways for i in range(ways + 1)]
        self.parts = [linear.weight[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
        if "bias" in linear:
            self.bias = linear.bias

    def __call__(self, x: mx.array) -> mx.array:
        outputs = []
        for stream, weight in zip(_streams(len(self.parts)), self.parts, strict=True):
            with mx.stream(stream):
                outputs.append(x @ weight.T)
        y = mx.concatenate(outputs, axis=-1)
        return y + self.bias if "bias" in self else y


def parallelize_linears(
    module: nn.Module, ways: int, min_elements: int = MIN_SPLIT_ELEMENTS
) -> int:
    """Replace every plain ``nn.Linear`` under ``module`` by a :class:`ParallelLinear` (on the
    CPU backend, ``ways`` > 1, and only layers with at least ``ways`` output features and
    ``min_elements`` weights); how many were replaced."""
    if ways < 2 or mx.default_device() != mx.cpu:
        return 0
    replaced = 0
    for parent in module.modules():
        for name in parent.children():
            child = parent[name]  # children() gives copies of lists
            if isinstance(child, list):
                for index, item in enumerate(child):
                    if _splittable(item, ways, min_elements):
                        child[index] = ParallelLinear(item, ways)
                        replaced += 1
            elif _splittable(child, ways, min_elements):
                parent[name] = ParallelLinear(child, ways)
                replaced += 1
    return replaced


def _splittable(module: object, ways: int, min_elements: int) -> bool:
    if type(module) is not nn.Linear:
        return False
    rows, columns = module.weight.shape
    return rows >= ways and rows * columns >= min_elements
