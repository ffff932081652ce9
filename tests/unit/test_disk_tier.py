"""The KV disk tier on its own (no server): its writer survives failed writes and drops blocks
when it falls behind; a full or read-only disk (a real tmpfs) turns writes off, and they come
back with a backoff once the disk takes them; checkpoints are fingerprinted by their weights.
(The tier inside a serving engine: api/test_disk_faults.py.)"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from mlxserve.core.kv.disk_tier import DiskTier
from mlxserve.registry.fingerprint import WEIGHT_HASHES_FILE, checkpoint_fingerprint

from ..support.disk import block, change_weights, fill, logged
from ..support.server import wait_until


def test_the_writer_survives_a_failed_write(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, "m", range(2), 16, 2**30)
    (tier.folder / "a.tmp.safetensors").mkdir()  # this block cannot be written
    tier.write("a", block(1))
    tier.write("b", block(2))
    assert wait_until(lambda: tier.has("b"))
    assert tier.failures == {"RuntimeError": 1} and tier.writing
    assert not tier.has("a") and tier.has("b")
    [(keys, values), _] = tier.read("b")
    assert keys.tolist() == block(2)[0][0].tolist() and values.tolist() == block(2)[0][1].tolist()


def test_a_writer_that_falls_behind_drops_blocks(tmp_path: Path) -> None:
    one_block = sum(k.nbytes + v.nbytes for k, v in block(0))
    tier = DiskTier(tmp_path, "m", range(2), 16, 2**30, max_queued_bytes=one_block)
    data = block(3)
    queued = sum(tier.write(f"b{i}", data) for i in range(200))
    assert tier.close(30)
    assert tier.dropped_writes > 0 and queued + tier.dropped_writes == 200
    assert tier.writes == queued == len(list(tier.folder.glob("*.safetensors")))


# ---- weights that change -----------------------------------------------------------------


def test_weight_hashes_are_cached_and_a_bad_cache_only_costs_a_rehash(
    tmp_path: Path, tiny_checkpoints: dict[str, Path]
) -> None:
    checkpoint = shutil.copytree(tiny_checkpoints["llama"], tmp_path / "checkpoint")
    cache = tmp_path / "cache" / WEIGHT_HASHES_FILE
    before = checkpoint_fingerprint("m", checkpoint, cache)
    assert checkpoint_fingerprint("m", checkpoint, None) == before
    change_weights(checkpoint)
    after = checkpoint_fingerprint("m", checkpoint, cache)
    assert after != before
    remembered = json.loads(cache.read_text())
    [entry] = remembered.values()
    cache.write_text(json.dumps({path: {**entry, "blake2b": "0"} for path in remembered}))
    assert checkpoint_fingerprint("m", checkpoint, cache) != after  # no rehash: size, mtime
    cache.write_text("{not json")
    assert checkpoint_fingerprint("m", checkpoint, cache) == after
    assert json.loads(cache.read_text()) == remembered  # rewritten
    unwritable = tmp_path / "a-file" / WEIGHT_HASHES_FILE
    unwritable.parent.write_text("")  # its parent is a file: the cache cannot be written
    assert checkpoint_fingerprint("m", checkpoint, unwritable) == after


def test_a_hub_snapshot_is_named_by_its_commit(
    tmp_path: Path, tiny_checkpoints: dict[str, Path]
) -> None:
    snapshots = tmp_path / "hub" / "models--org--tiny" / "snapshots"
    first = shutil.copytree(tiny_checkpoints["llama"], snapshots / "1111")
    second = shutil.copytree(tiny_checkpoints["llama"], snapshots / "2222")
    fingerprint = checkpoint_fingerprint("m", first)
    assert checkpoint_fingerprint("m", second) != fingerprint
    change_weights(first)  # the hub never changes a commit's files; its name stands for them
    assert checkpoint_fingerprint("m", first) == fingerprint


def test_the_disk_folder_is_named_by_the_fingerprint_not_the_model_name(
    tmp_path: Path, tiny_checkpoints: dict[str, Path]
) -> None:
    fingerprint = checkpoint_fingerprint("../../outside", tiny_checkpoints["llama"])
    assert fingerprint.isalnum() and "outside" not in fingerprint


# ---- a fault is not for good: writes come back when the disk does ------------------------


def remount(folder: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(folder)], check=True)


def offer_until(tier: DiskTier, condition: Callable[[], bool], timeout: float = 5) -> bool:
    """Offer the tier a new block every 50 ms until ``condition()`` holds (then no more)."""
    offered = iter(range(1000, 10**6))

    def offer() -> bool:
        if condition():
            return True
        number = next(offered)
        tier.write(f"offered{number}", block(number))
        return False

    return wait_until(offer, timeout)


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_writes_come_back_with_a_backoff_once_the_disk_takes_them(
    tmp_path: Path, tmpfs, tier_log: pytest.LogCaptureFixture, fault: str
) -> None:
    root = tmpfs(tmp_path / "kv", "size=1m")
    tier = DiskTier(root, "m", range(2), 16, 2**30, retry_first_s=0.5, retry_max_s=2)
    for i in range(4):
        assert tier.write(f"before{i}", block(i))
    assert wait_until(lambda: tier.writes == 4)
    kind = "ENOSPC" if fault == "full" else "EROFS"
    if fault == "full":
        filler = fill(root)
    else:
        remount(root, "ro")

    assert tier.write("first", block(10))  # this one meets the fault: writes are off
    assert wait_until(lambda: not tier.writing)
    assert tier.failures == {kind: 1} and tier.writes == 4
    [off] = logged(tier_log, "writes are off")
    assert kind in off and "trying again in 0.5 s" in off and "up to 2 s" in off
    assert not tier.write("soon", block(11))  # within the wait: not even tried
    assert tier.write_retries == 0

    time.sleep(0.55)
    assert tier.write("try", block(12))  # the wait is over: this block tries
    assert not tier.write("meanwhile", block(13))  # one try at a time
    assert wait_until(lambda: not tier._pending)
    assert not tier.writing and tier.write_retries == 1
    assert tier._retry_delay == 1.0  # the try failed: it waits twice as long
    assert tier.failures == {kind: 1}  # tries are counted apart
    assert tier.read("before1") is not None  # reads go on all along

    if fault == "full":
        filler.unlink()
    else:
        remount(root, "rw")
    freed = time.monotonic()
    assert offer_until(tier, lambda: tier.writing)
    assert time.monotonic() - freed < 1.0 + 0.5  # within the wait it had reached
    assert wait_until(lambda: tier.writes == 5) and tier.write_retries == 2
    [back] = logged(tier_log, "writes are back on")
    assert "2 tries" in back

    for i in range(4):
        assert tier.write(f"after{i}", block(20 + i))
    assert wait_until(lambda: tier.writes == 9)  # four blocks before, and four after again
    [(keys, _), _] = tier.read("after3")
    assert keys.tolist() == block(23)[0][0].tolist()
    [(keys, _), _] = tier.read("before3")
    assert keys.tolist() == block(3)[0][0].tolist()
    assert tier.close(10)


def test_the_wait_doubles_up_to_the_most_and_starts_over_only_after_a_good_while(
    tmp_path: Path, tmpfs
) -> None:
    root = tmpfs(tmp_path / "kv", "size=1m")
    tier = DiskTier(root, "m", range(2), 16, 2**30, retry_first_s=0.05, retry_max_s=0.8)
    filler = fill(root)
    waits = []
    for i in range(6):  # the first meets the fault, the others are tries
        assert wait_until(lambda i=i: tier.write(f"b{i}", block(i)), timeout=5)
        assert wait_until(lambda: not tier._pending)
        waits.append(tier._retry_delay)
    assert waits == [0.05, 0.1, 0.2, 0.4, 0.8, 0.8] and tier.write_retries == 5
    filler.unlink()
    assert offer_until(tier, lambda: tier.writing)
    filler = fill(root)
    assert offer_until(tier, lambda: not tier.writing)
    assert tier._retry_delay == 0.8  # the fault came back soon: no hurry to try again
    assert tier.failures == {"ENOSPC": 2}
    filler.unlink()
    assert offer_until(tier, lambda: tier.writing)
    time.sleep(0.85)  # writes held for the longest wait: a new fault waits the least again
    filler = fill(root)
    assert offer_until(tier, lambda: not tier.writing)
    assert tier._retry_delay == 0.05


def test_a_folder_that_could_not_be_opened_is_tried_again(tmp_path: Path, tmpfs) -> None:
    root = tmpfs(tmp_path / "kv", "size=1m")
    remount(root, "ro")  # the model's folder cannot be made
    tier = DiskTier(root, "m", range(2), 16, 2**30, retry_first_s=0.05, retry_max_s=0.2)
    assert not tier.reading and not tier.writing and tier.failures == {"EROFS": 1}
    remount(root, "rw")
    assert offer_until(tier, lambda: tier.enabled)
    assert tier.write("b", block(1))
    assert wait_until(lambda: tier.has("b"))
    [(keys, _), _] = tier.read("b")
    assert keys.tolist() == block(1)[0][0].tolist()
