"""Real disk faults for the KV disk-tier tests: a tmpfs that really is full or read-only (also
for root, whom file modes do not stop), the tier's log, blocks to write, checkpoints whose
weights change. The fixtures reach every test through ``pytest_plugins`` in tests/conftest.py.
"""

from __future__ import annotations

import array
import json
import logging
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import mlx.core as mx
import pytest


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


def fill(folder: Path, leave: int = 0) -> Path:
    """A file that leaves only ``leave`` bytes free on the file system of ``folder``."""
    stats = os.statvfs(folder)
    filler = folder / "filler"
    filler.write_bytes(b"\1" * max(stats.f_bavail * stats.f_frsize - leave, 0))
    return filler


def logged(log: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in log.records if text in r.getMessage()]


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
