"""The KV blocks' bookkeeping on its own: chained, salted block hashes; reserving, reusing,
releasing and evicting blocks (least recently used first)."""

from __future__ import annotations

from mlxserve.core.kv.blocks import BlockManager, block_hashes


def test_block_hashes_are_chained_and_salted() -> None:
    tokens = list(range(40))
    hashes = block_hashes(tokens, 16, "model-a")
    assert len(hashes) == 2  # the last 8 tokens are not a full block
    assert block_hashes(tokens[:32] + [99] * 8, 16, "model-a") == hashes
    assert block_hashes([1] + tokens[1:], 16, "model-a")[1] != hashes[1]  # chained
    assert block_hashes(tokens, 16, "model-b") != hashes


def test_reserve_reuse_release_and_lru_eviction() -> None:
    manager = BlockManager(num_blocks=6, block_size=4)
    first = manager.reserve(16, [])
    assert manager.used_blocks == 4 and not manager.can_reserve(12, [])
    assert manager.release(first, ["a", "b", "c"]) == ["a", "b", "c"]
    assert manager.used_blocks == 3 and manager.cached_prefix(["a", "b", "x"]) == ["a", "b"]
    second = manager.reserve(12, ["a", "b"])  # reuses two, needs one more
    assert manager.used_blocks == 4
    third = manager.reserve(12, [])  # evicts c, the least recently used idle block
    assert manager.take_evicted() == ["c"]
    assert not manager.can_reserve(4, [])
    manager.release(third, [])
    manager.release(second, ["a", "b", "d"])
    assert manager.cached_prefix(["a", "b", "d"]) == ["a", "b", "d"]
    assert manager.used_blocks == 3
