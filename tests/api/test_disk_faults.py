"""The KV disk tier is an optimisation: a disk fault turns it off, never fails a request. Real
servers on real faulty disks (tmpfs mounts); the tier on its own: unit/test_disk_tier.py."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import pytest

from mlxserve.core.kv.blocks import block_hashes
from mlxserve.core.kv.disk_tier import checksum

from ..support.disk import block, change_weights, fill, logged
from ..support.kv_cache import PROMPT, complete, config_for, disk_config
from ..support.server import RunningServer, get, running_server, wait_until

BLOCK_BYTES = 4 * 2 * 2 * 16 * 64 * 4  # tiny llama: 4 layers, k and v, 2 heads of 64, float32


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
        assert wait_until(lambda: server.engine.workers["m"].runner.prefix_store.disk.writes == 6)
    read_only(kv)
    with running_server(config) as server:
        store = server.engine.workers["m"].runner.prefix_store
        assert text_and_cached(complete(server, PROMPT)) == (cold["choices"][0]["text"], 96)
        assert store.disk.reads == 6  # reads need no writes
        other = complete(server, [9] * 60)
        assert wait_until(lambda: not store.disk.writing)
        assert sum(store.disk.failures.values()) >= 1 and store.disk.writes == 0
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
        disk = server.engine.workers["m"].runner.prefix_store.disk
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
        disk = server.engine.workers["m"].runner.prefix_store.disk
        assert wait_until(lambda: not disk.writing)
        disk.close(10)  # the writer lived on: it drains its queue and stops
        assert disk.failures == {"ENOSPC": 1} and disk.writes == 2
        assert text_and_cached(complete(server, PROMPT)) == (texts[0], 96)
        assert metric(server, "disk_tier_failures_total") == 1
    assert not list(kv.rglob("*.tmp.safetensors"))
    assert len(list(kv.rglob("*.safetensors"))) == 2
    assert texts[1] == reference_text(tmp_path, tiny_checkpoints["llama"], prompts[1])


def test_spilled_blocks_are_written_by_close_and_read_after_a_restart(
    tmp_path: Path, tiny_checkpoints: dict[str, Path]
) -> None:
    config = disk_config(tmp_path, tiny_checkpoints["llama"])  # writes evicted blocks only
    with running_server(config) as server:
        cold = complete(server, PROMPT)
        complete(server, [3], 1)  # the engine copies blocks out in the step after a request
        store = server.engine.workers["m"].runner.prefix_store
        assert store.disk.writes == 0 and len(store.blocks) == 6
        assert store.spill_to_disk() == 6
        assert store.disk.close(10) and store.disk.writes == 6
        assert not store.disk.write("late", block(1))  # closed
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
        assert wait_until(lambda: server.engine.workers["m"].runner.prefix_store.disk.writes == 6)
    third = block_hashes(PROMPT, 16, key)[2]
    [path] = list((tmp_path / "kv").rglob(f"{third}.safetensors"))
    arrays, meta = mx.load(str(path), return_metadata=True)
    forged = damage(arrays)
    mx.eval(forged)
    meta["checksum"] = checksum([forged[name] for name in sorted(forged, key=_array_order)])
    mx.save_safetensors(str(path), forged, metadata=meta)
    with running_server(config) as server:
        store = server.engine.workers["m"].runner.prefix_store
        assert text_and_cached(complete(server, PROMPT)) == (cold["choices"][0]["text"], 32)
        assert store.disk.rejected == 1 and store.disk.reads == 2
        assert metric(server, "disk_tier_rejected_blocks_total") == 1
        assert wait_until(lambda: store.disk.writes == 1)  # written again from good KV
    rewritten = mx.load(str(path))
    assert sorted(rewritten) == sorted(arrays)
    assert all(
        rewritten[n].shape == a.shape and rewritten[n].dtype == a.dtype for n, a in arrays.items()
    )


def _array_order(name: str) -> tuple[int, str]:
    kind, layer = name.split(".")
    return int(layer), kind


# ---- weights that change -----------------------------------------------------------------


def test_new_weights_of_the_same_shapes_do_not_reuse_old_blocks(
    tmp_path: Path, tiny_checkpoints: dict[str, Path]
) -> None:
    checkpoint = shutil.copytree(tiny_checkpoints["llama"], tmp_path / "checkpoint")
    config = disk_config(tmp_path, checkpoint, 'disk_write = "all"\n')
    with running_server(config) as server:
        complete(server, PROMPT)
        assert wait_until(lambda: server.engine.workers["m"].runner.prefix_store.disk.writes == 6)
    change_weights(checkpoint)
    with running_server(config) as server:
        warm = complete(server, PROMPT)
    assert text_and_cached(warm) == (reference_text(tmp_path, checkpoint), 0)
    assert len([p for p in (tmp_path / "kv").iterdir()]) == 2  # one folder per fingerprint


# ---- a fault is not for good: writes come back when the disk does ------------------------


def test_a_server_whose_disk_was_full_writes_again_once_there_is_room(
    tmp_path: Path, tiny_checkpoints: dict[str, Path], tmpfs, tier_log
) -> None:
    kv = tmpfs(tmp_path / "kv", "size=2m")
    filler = fill(kv, leave=160 * 1024)  # room for two blocks of 64 KiB and a bit
    config = disk_config(tmp_path, tiny_checkpoints["llama"], 'disk_write = "all"\n')
    with running_server(config) as server:
        store = server.engine.workers["m"].runner.prefix_store
        disk = store.disk
        cold = complete(server, PROMPT)
        assert wait_until(lambda: not disk.writing)
        assert store.disk.writes == 2 and disk.failures == {"ENOSPC": 1}
        assert metric(server, "disk_tier_enabled") == 0
        while_off = get(server, "/metrics").text
        complete(server, [5] * 100)
        assert store.disk.writes == 2  # the disk is full: nothing more is written
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
