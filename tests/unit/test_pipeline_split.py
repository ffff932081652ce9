"""Split plans: even, by memory, and explicit layer counts."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from mlxserve.core.config.schema import DistributedConfig
from mlxserve.core.distributed.cluster import Cluster
from mlxserve.core.errors import ModelDoesNotFitError
from mlxserve.core.model.loader import build_lazy
from mlxserve.core.model.stages import check_counts, split_by_memory, split_even, stage_ranges
from mlxserve.registry import placement
from mlxserve.registry.plugins import load_plugins

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


@pytest.mark.parametrize(
    ("link_us", "bandwidth_mb_s", "expected"),
    [(20, 100, "tensor"), (20, 100_000, "pipeline"), (5000, 100, "pipeline")],
)
def test_auto_splits_layers_only_when_the_link_pays_for_it(
    link_us: int,
    bandwidth_mb_s: int,
    expected: str,
    tiny_checkpoints: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Tiny llama: 4 layers, ~2.6 MiB. At 100 MiB/s rank 0 would spare ~13 ms a token,
    against 2 x 4 all-reduces: 0.16 ms at 20 us each (tensor), 40 ms at 5 ms (pipeline)."""
    family = load_plugins().family("llama")
    model, _ = build_lazy(tiny_checkpoints["llama"], family.model_classes)
    monkeypatch.setattr(placement, "_all_reduce_us", lambda hidden, all_sum: link_us)
    monkeypatch.setattr(placement, "_matvec_mb_per_s", lambda: bandwidth_mb_s)
    cluster = Cluster(None, 0, 2)
    monkeypatch.setattr(cluster, "gather", lambda value: [value, value + 1])  # rank 0 decides
    config = DistributedConfig(hosts=["127.0.0.1", "127.0.0.1"])
    with caplog.at_level(logging.INFO, logger="mlxserve.registry.placement"):
        assert placement.plan_placement(family, model, cluster, config).strategy == expected
    assert f'strategy "auto": {expected}' in caplog.text and "all-reduce" in caplog.text


def test_a_learned_position_table_is_found_and_rotary_models_have_none() -> None:
    from mlx_lm.models import gpt2, llama

    from mlxserve.core.model.layout import DecoderLayout

    args = {"vocab_size": 64, "num_attention_heads": 2, "num_hidden_layers": 1}
    learned = gpt2.Model(
        gpt2.ModelArgs(
            model_type="gpt2",
            n_ctx=32,
            n_embd=16,
            n_head=2,
            n_layer=1,
            n_positions=32,
            layer_norm_epsilon=1e-5,
            vocab_size=64,
        )
    )
    rotary = llama.Model(
        llama.ModelArgs(
            model_type="llama",
            hidden_size=16,
            intermediate_size=32,
            rms_norm_eps=1e-5,
            num_key_value_heads=2,
            **args,
        )
    )
    assert DecoderLayout(learned).learned_positions() == "model.wpe"
    assert DecoderLayout(rotary).learned_positions() is None
