"""Split plans: even, by memory, and explicit layer counts."""

from __future__ import annotations

import pytest

from mlxserve.core.errors import ModelDoesNotFitError
from mlxserve.core.pipeline import check_counts, split_by_memory, split_even, stage_ranges

MiB = 2**20


def test_even_split_gives_the_remainder_to_early_stages() -> None:
    assert split_even(10, 3) == [4, 3, 3]
    assert split_even(4, 4) == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="5 stages"):
        split_even(4, 5)


def test_memory_split_follows_free_memory() -> None:
    layers = [100 * MiB] * 12
    assert split_by_memory(layers, [3000 * MiB, 1000 * MiB]) == [9, 3]
    assert split_by_memory(layers, [1000 * MiB, 1000 * MiB]) == [6, 6]
    assert split_by_memory(layers, [600 * MiB, 2000 * MiB]) == [3, 9]


def test_memory_split_gives_every_stage_a_layer() -> None:
    assert split_by_memory([10] * 4, [10_000, 40, 40]) == [2, 1, 1]


def test_memory_split_refuses_a_model_that_cannot_fit() -> None:
    with pytest.raises(ModelDoesNotFitError, match="MiB"):
        split_by_memory([100 * MiB] * 10, [400 * MiB, 400 * MiB])
    with pytest.raises(ModelDoesNotFitError, match="rank 1"):
        split_by_memory([100 * MiB] * 4, [10_000 * MiB, 50 * MiB])


def test_explicit_counts() -> None:
    assert check_counts([3, 1], 4) == [3, 1]
    with pytest.raises(ValueError, match="sum to 4"):
        check_counts([2, 1], 4)
    with pytest.raises(ValueError, match="at least one"):
        check_counts([4, 0], 4)
    assert stage_ranges([3, 1]) == [range(0, 3), range(3, 4)]
