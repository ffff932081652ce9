"""The disk tier of the prefix cache: KV blocks as files, found by hash, also after a restart.

Each block is one safetensors file named by its content hash, under a folder per model
fingerprint. A file is used only if its metadata (model, layers, block size, format) and a
checksum of its arrays match; a stale, truncated or corrupt file is deleted and ignored.
"""

from __future__ import annotations

import logging
import os
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
    crc = 0
    for array in arrays:
        crc = zlib.crc32(memoryview(mx.contiguous(array)).cast("B"), crc)
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
        files = sorted(self.folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
        self.index: OrderedDict[str, int] = OrderedDict((p.stem, p.stat().st_size) for p in files)
        self.total_bytes = sum(self.index.values())
        self.reads = self.writes = 0

    def _path(self, block_hash: str) -> Path:
        return self.folder / f"{block_hash}.safetensors"

    def has(self, block_hash: str) -> bool:
        return block_hash in self.index

    def write(self, block_hash: str, data: BlockData) -> None:
        if block_hash in self.index:
            self.index.move_to_end(block_hash)
            return
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
        self.index[block_hash] = path.stat().st_size
        self.total_bytes += self.index[block_hash]
        self.writes += 1
        self._shrink()

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
            self._drop(block_hash)
            return None
        self.index.move_to_end(block_hash)
        os.utime(path)
        self.reads += 1
        return data

    def _drop(self, block_hash: str) -> None:
        self.total_bytes -= self.index.pop(block_hash, 0)
        self._path(block_hash).unlink(missing_ok=True)

    def _shrink(self) -> None:
        while self.total_bytes > self.max_bytes and len(self.index) > 1:
            oldest = next(iter(self.index))
            self._drop(oldest)
