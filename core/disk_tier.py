"""The disk tier of the prefix cache: KV blocks as files, found by hash, also after a restart.

Each block is one safetensors file named by its content hash, under a folder per model
fingerprint. A file is used only if its metadata (model, layers, block size, format) and a
checksum of its arrays match; a stale, truncated or corrupt file is deleted and ignored.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import zlib
from collections import OrderedDict
from pathlib import Path

import mlx.core as mx

log = logging.getLogger(__name__)

FORMAT = "mlxserve-kv-block-2"
BlockData = list[tuple[mx.array, mx.array]]


def _checksum(arrays: list[mx.array]) -> str:
    # Guards against truncated or damaged files, not against tampering: CRC-32 is enough and
    # several times faster than a cryptographic hash over hundreds of MB of KV.
    # The arrays are evaluated and contiguous (the runner copies blocks out so, and mx.load
    # gives them so): reading their buffers starts no MLX work, on whichever thread.
    crc = 0
    for array in arrays:
        crc = zlib.crc32(memoryview(array).cast("B"), crc)
    return f"{crc:08x}"


class DiskTier:
    """KV blocks on disk for one model stage, bounded in size, least recently used out first."""

    def __init__(
        self, root: Path, model_key: str, layers: range, block_size: int, max_bytes: int
    ) -> None:
        self.folder = Path(root).expanduser() / model_key
        self.folder.mkdir(parents=True, exist_ok=True)
        self.meta = {
            "format": FORMAT,
            "model": model_key,
            "layers": f"{layers.start}-{layers.stop - 1}",
            "block_size": str(block_size),
        }
        self.max_bytes = max_bytes
        for leftover in self.folder.glob("*.tmp.safetensors"):  # a write cut short
            leftover.unlink(missing_ok=True)
        files = sorted(self.folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
        self.index: OrderedDict[str, int] = OrderedDict((p.stem, p.stat().st_size) for p in files)
        self.total_bytes = sum(self.index.values())
        self.reads = self.writes = 0
        # Writing hundreds of MB must not hold up the engine: one writer thread does it.
        self._lock = threading.Lock()
        self._pending: set[str] = set()
        self._queue: queue.SimpleQueue[tuple[str, BlockData]] = queue.SimpleQueue()
        threading.Thread(target=self._write_forever, name="mlxserve-kv-disk", daemon=True).start()

    def _path(self, block_hash: str) -> Path:
        return self.folder / f"{block_hash}.safetensors"

    def has(self, block_hash: str) -> bool:
        with self._lock:
            return block_hash in self.index

    def write(self, block_hash: str, data: BlockData) -> None:
        """Queue a block (evaluated arrays) to be written; returns at once."""
        with self._lock:
            if block_hash in self.index:
                self.index.move_to_end(block_hash)
                return
            if block_hash in self._pending:
                return
            self._pending.add(block_hash)
        self._queue.put((block_hash, data))

    def _write_forever(self) -> None:
        while True:
            block_hash, data = self._queue.get()
            try:
                size = self._write_file(block_hash, data)
            except OSError as exc:
                log.warning("could not write KV block %s: %s", block_hash, exc)
                size = None
            with self._lock:
                self._pending.discard(block_hash)
                if size is not None:
                    self.index[block_hash] = size
                    self.total_bytes += size
                    self.writes += 1
                    self._shrink()

    def _write_file(self, block_hash: str, data: BlockData) -> int:
        arrays = {
            f"{kind}.{layer}": array
            for layer, pair in enumerate(data)
            for kind, array in zip("kv", pair, strict=True)
        }
        meta = {**self.meta, "checksum": _checksum(list(arrays.values()))}
        path = self._path(block_hash)
        staging = path.with_suffix(".tmp.safetensors")
        mx.save_safetensors(str(staging), arrays, metadata=meta)
        os.replace(staging, path)
        return path.stat().st_size

    def read(self, block_hash: str) -> BlockData | None:
        """The block's arrays, or None (and the file gone) if it is not what it should be."""
        path = self._path(block_hash)
        try:
            arrays, meta = mx.load(str(path), return_metadata=True)
            layers = len(arrays) // 2
            data = [(arrays[f"k.{i}"], arrays[f"v.{i}"]) for i in range(layers)]
            expected = {**self.meta, "checksum": _checksum([a for pair in data for a in pair])}
            if meta != expected or len(arrays) != 2 * layers:
                raise ValueError("metadata or checksum does not match")
        except Exception as exc:  # a stale or corrupt file is never used
            log.warning("ignoring KV block file %s: %s", path.name, exc)
            with self._lock:
                self._drop(block_hash)
            return None
        with self._lock:
            if block_hash in self.index:
                self.index.move_to_end(block_hash)
            self.reads += 1
        os.utime(path)
        return data

    def _drop(self, block_hash: str) -> None:
        self.total_bytes -= self.index.pop(block_hash, 0)
        self._path(block_hash).unlink(missing_ok=True)

    def _shrink(self) -> None:
        while self.total_bytes > self.max_bytes and len(self.index) > 1:
            oldest = next(iter(self.index))
            self._drop(oldest)
