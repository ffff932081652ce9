"""The KV disk tier is an optimisation: a disk fault turns it off, never fails a request."""

from __future__ import annotations

import array
import json
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import mlx.core as mx
import pytest

from mlxserve.core.kv.blocks import block_hashes
from mlxserve.core.kv.disk_tier import DiskTier, checksum
from mlxserve.registry.fingerprint import WEIGHT_HASHES_FILE, checkpoint_fingerprint

from .server import RunningServer, get, running_server, wait_until
from .test_kv_cache import PROMPT, complete, config_for, disk_config

BLOCK_BYTES = 4 * 2 * 2 * 16 * 64 * 4  # tiny llama: 4 layers, k and v, 2 heads of 64, float32


@pytest.fixture
def tmpfs() -> Iterator[Callable[[Path, str], Path]]:
    """Mounts a tmpfs (options like "size=160k" or "ro") on a folder: a disk that really is
    full or read-only, also for root, whom file modes do not stop."""
    mounted: list[Path] = []

    def mount(folder: Path, options: str) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        command = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture
def read_only(tmpfs: Callable[[Path, str], Path]) -> Iterator[Callable[[Path], None]]:
    """Makes a folder read-only: by its mode for a user, by a read-only tmpfs for root (the
    folder must then be a tmpfs mounted by ``tmpfs``)."""
    changed: list[Path] = []

    def make(folder: Path) -> None:
        if os.geteuid() == 0:
            command = ["mount", "-o", "remount,ro", str(folder)]
            subprocess.run(command, check=True, capture_output=True)
        else:
            for each in [folder, *(p for p in folder.rglob("*") if p.is_dir())]:
                each.chmod(0o555)
                changed.append(each)

    yield make
    for folder in changed:
        folder.chmod(0o755)


def disk_folder(tmp_path: Path, tmpfs: Callable[[Path, str], Path], options: str) -> Path:
    """The disk tier's root: a tmpfs for root (so it can be made read-only), else a folder."""
    folder = tmp_path / "kv"
    if os.geteuid() == 0:
        return tmpfs(folder, options)
    folder.mkdir(parents=True)
    return folder


def reference_text(tmp_path: Path, checkpoint: Path, prompt: list[int] = PROMPT) -> str:
    with running_server(config_for(tmp_path / "reference", checkpoint)) as server:
        return complete(server, prompt)["choices"][0]["text"]


def text_and_cached(response: dict) -> tuple[str, int]:
    cached = response["usage"]["prompt_tokens_details"]["cached_tokens"]
    return response["choices"][0]["text"], cached


def metric(server: RunningServer, name: str) -> float:
    lines = get(server, "/metrics").text.splitlines()
    [line] = [line for line in lines if line.startswith(f'mlxserve_{name}{{model="m"}}')]
    return float(line.split()[-1])


# ---- read-only disks ---------------------------------------------------------------------


def test_a_read_only_disk_with_blocks_keeps_serving_them(
    tmp_path: Path, tiny_checkpoints: dict[str, Path], tmpfs, read_only
) -> None:
    kv = disk_folder(tmp_path, tmpfs, "size=4m")
    config = disk_config(tmp_path, tiny_checkpoints["llama"], 'disk_write = "all"\n')
    with running_server(config) as server:
        cold = complete(server, PROMPT)
        assert wait_until(lambda: server.engine.workers["m"].runner.disk_writes == 6)
    read_only(kv)
    with running_server(config) as server:
        runner = server.engine.workers["m"].runner
        assert text_and_cached(complete(server, PROMPT)) == (cold["choices"][0]["text"], 96)
        assert runner.disk_reads == 6  # reads need no writes
        other = complete(server, [9] * 60)
        assert wait_until(lambda: not runner.disk.writing)
        assert runner.disk_failures >= 1 and runner.disk_writes == 0
        assert metric(server, "disk_tier_enabled") == 0
    assert other["choices"][0]["text"] == reference_text(
        tmp_path, tiny_checkpoints["llama"], [9] * 60
    )
    assert len(list(kv.rglob("*.safetensors"))) == 6


def test_a_read_only_disk_without_the_model_folder_turns_the_tier_off(
    tmp_path: Path, tiny_checkpoints: dict[str, Path], tmpfs, read_only
) -> None:
    kv = disk_folder(tmp_path, tmpfs, "size=64k")
    read_only(kv)
    config = disk_config(tmp_path, tiny_checkpoints["llama"], 'disk_write = "all"\n')
    with running_server(config) as server:
        first, second = complete(server, PROMPT), complete(server, PROMPT)
        assert get(server, "/health").status_code == 200
        disk = server.engine.workers["m"].runner.disk
        assert not disk.reading and not disk.writing
        assert metric(server, "disk_tier_enabled") == 0
        assert metric(server, "disk_tier_failures_total") == 1  # logged and counted once
    assert first["choices"][0]["text"] == reference_text(tmp_path, tiny_checkpoints["llama"])
    assert text_and_cached(second) == (first["choices"][0]["text"], 96)  # memory tier still on
    assert list(kv.iterdir()) == []


# ---- full disks and the writer -----------------------------------------------------------


def test_a_full_disk_turns_writes_off_and_leaves_no_partial_files(
    tmp_path: Path, tiny_checkpoints: dict[str, Path], tmpfs
) -> None:
    kv = tmpfs(tmp_path / "kv", "size=160k")  # room for two blocks of 64 KiB and a bit
    config = disk_config(tmp_path, tiny_checkpoints["llama"], 'disk_write = "all"\n')
    prompts = [PROMPT, [5] * 100, [6] * 100]
    with running_server(config) as server:
        texts = [complete(server, p)["choices"][0]["text"] for p in prompts]
        disk = server.engine.workers["m"].runner.disk
        assert wait_until(lambda: not disk.writing)
        disk.close(10)  # the writer lived on: it drains its queue and stops
        assert disk.failures == {"ENOSPC": 1} and disk.writes == 2
        assert text_and_cached(complete(server, PROMPT)) == (texts[0], 96)
        assert metric(server, "disk_tier_failures_total") == 1
    assert not list(kv.rglob("*.tmp.safetensors"))
    assert len(list(kv.rglob("*.safetensors"))) == 2
    assert texts[1] == reference_text(tmp_path, tiny_checkpoints["llama"], prompts[1])


def block(seed: int, layers: int = 2) -> list[tuple[mx.array, mx.array]]:
    data = [
        (
            mx.full((1, 2, 16, 8), seed + layer, mx.float32),
            mx.full((1, 2, 16, 8), -seed, mx.float32),
        )
        for layer in range(layers)
    ]
    mx.eval(data)
    return data


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


def test_spilled_blocks_are_written_by_close_and_read_after_a_restart(
    tmp_path: Path, tiny_checkpoints: dict[str, Path]
) -> None:
    config = disk_config(tmp_path, tiny_checkpoints["llama"])  # writes evicted blocks only
    with running_server(config) as server:
        cold = complete(server, PROMPT)
        complete(server, [3], 1)  # the engine copies blocks out in the step after a request
        runner = server.engine.workers["m"].runner
        assert runner.disk_writes == 0 and len(runner.blocks) == 6
        assert runner.spill_to_disk() == 6
        assert runner.disk.close(10) and runner.disk_writes == 6
        assert not runner.disk.write("late", block(1))  # closed
    with running_server(config) as server:
        assert text_and_cached(complete(server, PROMPT)) == (cold["choices"][0]["text"], 96)


# ---- files that are not what they should be ----------------------------------------------


def one_layer(arrays: dict[str, mx.array]) -> dict[str, mx.array]:
    return {name: array for name, array in arrays.items() if name.endswith(".0")}


def half_block(arrays: dict[str, mx.array]) -> dict[str, mx.array]:
    return {name: mx.contiguous(array[..., :8, :]) for name, array in arrays.items()}


def float16(arrays: dict[str, mx.array]) -> dict[str, mx.array]:
    return {name: array.astype(mx.float16) for name, array in arrays.items()}


def wider(arrays: dict[str, mx.array]) -> dict[str, mx.array]:
    return {name: mx.concatenate([array, array], axis=-1) for name, array in arrays.items()}


@pytest.mark.parametrize("damage", [one_layer, half_block, float16, wider])
def test_a_block_file_with_a_valid_checksum_but_the_wrong_arrays_is_dropped(
    tmp_path: Path, tiny_checkpoints: dict[str, Path], damage: Callable
) -> None:
    config = disk_config(tmp_path, tiny_checkpoints["llama"], 'disk_write = "all"\n')
    with running_server(config) as server:
        cold = complete(server, PROMPT)
        key = server.engine.workers["m"].key
        assert wait_until(lambda: server.engine.workers["m"].runner.disk_writes == 6)
    third = block_hashes(PROMPT, 16, key)[2]
    [path] = list((tmp_path / "kv").rglob(f"{third}.safetensors"))
    arrays, meta = mx.load(str(path), return_metadata=True)
    forged = damage(arrays)
    mx.eval(forged)
    meta["checksum"] = checksum([forged[name] for name in sorted(forged, key=_array_order)])
    mx.save_safetensors(str(path), forged, metadata=meta)
    with running_server(config) as server:
        runner = server.engine.workers["m"].runner
        assert text_and_cached(complete(server, PROMPT)) == (cold["choices"][0]["text"], 32)
        assert runner.disk_rejected_blocks == 1 and runner.disk_reads == 2
        assert metric(server, "disk_tier_rejected_blocks_total") == 1
        assert wait_until(lambda: runner.disk_writes == 1)  # written again from good KV
    rewritten = mx.load(str(path))
    assert sorted(rewritten) == sorted(arrays)
    assert all(
        rewritten[n].shape == a.shape and rewritten[n].dtype == a.dtype for n, a in arrays.items()
    )


def _array_order(name: str) -> tuple[int, str]:
    kind, layer = name.split(".")
    return int(layer), kind


# ---- weights that change -----------------------------------------------------------------


def change_weights(checkpoint: Path) -> None:
    """New weights of the same shapes, in a file of the same size: one tensor negated in
    place (safetensors: an 8-byte header length, a JSON header, then the data)."""
    with (checkpoint / "model.safetensors").open("r+b") as file:
        header_length = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(header_length))
        name = next(n for n in sorted(header) if "layers.0" in n and n.endswith("k_proj.weight"))
        assert header[name]["dtype"] == "F32"
        start, end = header[name]["data_offsets"]
        file.seek(8 + header_length + start)
        values = array.array("f", file.read(end - start))
        file.seek(8 + header_length + start)
        file.write(array.array("f", (-v for v in values)).tobytes())


def test_new_weights_of_the_same_shapes_do_not_reuse_old_blocks(
    tmp_path: Path, tiny_checkpoints: dict[str, Path]
) -> None:
    checkpoint = shutil.copytree(tiny_checkpoints["llama"], tmp_path / "checkpoint")
    config = disk_config(tmp_path, checkpoint, 'disk_write = "all"\n')
    with running_server(config) as server:
        complete(server, PROMPT)
        assert wait_until(lambda: server.engine.workers["m"].runner.disk_writes == 6)
    change_weights(checkpoint)
    with running_server(config) as server:
        warm = complete(server, PROMPT)
    assert text_and_cached(warm) == (reference_text(tmp_path, checkpoint), 0)
    assert len([p for p in (tmp_path / "kv").iterdir()]) == 2  # one folder per fingerprint


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


@pytest.fixture
def tier_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """What the disk tier logs (caught at its own logger, whatever the root's set-up)."""
    logger = logging.getLogger("mlxserve.core.kv.disk_tier")
    level, propagate = logger.level, logger.propagate
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # caplog's handler may be on the root too: each line once
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)
        logger.setLevel(level)
        logger.propagate = propagate


def fill(folder: Path, leave: int = 0) -> Path:
    """A file that leaves only ``leave`` bytes free on the file system of ``folder``."""
    stats = os.statvfs(folder)
    filler = folder / "filler"
    filler.write_bytes(b"\1" * max(stats.f_bavail * stats.f_frsize - leave, 0))
    return filler


def remount(folder: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(folder)], check=True)


def logged(log: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in log.records if text in r.getMessage()]


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


def test_a_server_whose_disk_was_full_writes_again_once_there_is_room(
    tmp_path: Path, tiny_checkpoints: dict[str, Path], tmpfs, tier_log
) -> None:
    kv = tmpfs(tmp_path / "kv", "size=2m")
    filler = fill(kv, leave=160 * 1024)  # room for two blocks of 64 KiB and a bit
    config = disk_config(tmp_path, tiny_checkpoints["llama"], 'disk_write = "all"\n')
    with running_server(config) as server:
        runner = server.engine.workers["m"].runner
        disk = runner.disk
        cold = complete(server, PROMPT)
        assert wait_until(lambda: not disk.writing)
        assert runner.disk_writes == 2 and disk.failures == {"ENOSPC": 1}
        assert metric(server, "disk_tier_enabled") == 0
        while_off = get(server, "/metrics").text
        complete(server, [5] * 100)
        assert runner.disk_writes == 2  # the disk is full: nothing more is written
        filler.unlink()

        sent = []

        def one_more_request() -> bool:
            sent.append(complete(server, [7 + len(sent)] * 40, 1))
            return disk.writing

        assert wait_until(one_more_request, timeout=15)  # the first wait is 1 s
        assert 'mlxserve_disk_tier_writable{model="m"} 0.0' in while_off
        assert metric(server, "disk_tier_writable") == 1
        assert metric(server, "disk_tier_enabled") == 1
        assert metric(server, "disk_tier_write_retries_total") >= 1
        assert metric(server, "disk_tier_failures_total") == 1
        fresh = [(i * 7) % 200 + 3 for i in range(100)]
        complete(server, fresh)
        hashes = block_hashes(fresh, 16, server.engine.workers["m"].key)
        assert len(hashes) == 6
        assert wait_until(lambda: all(disk.has(h) for h in hashes))  # every block again
        assert text_and_cached(complete(server, PROMPT)) == (cold["choices"][0]["text"], 96)
        [off] = logged(tier_log, "writes are off")
        assert "ENOSPC" in off and "trying again in 1 s (then backing off up to 300 s)" in off
        assert len(logged(tier_log, "writes are back on")) == 1
