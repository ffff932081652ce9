"""The disk tier of the prefix cache: KV blocks as files, found by hash, also after a restart.

Each block is one safetensors file named by its content hash, under a folder per model
fingerprint. A file is used only if its metadata (model, layers, block size, format), a
checksum of its arrays and the arrays' names, shapes and dtypes all match what the runner
needs; anything else is deleted and ignored.

The tier is an optimisation: a disk fault never fails a request or a model load. A folder
that cannot be opened turns the tier off; a disk that will not take writes (full, read-only,
no permission) turns its writes off; each is logged and counted in ``failures``. Neither is for
good: once ``retry_first_s`` has passed, the next block to write tries again (opening the
folder first, if that had failed), and every try that fails doubles the wait, up to
``retry_max_s``; the first that works turns the tier back on (logged too). Tries are counted
in ``write_retries``; the wait starts over from ``retry_first_s`` only once writes have held
for ``retry_max_s``, so a disk that keeps filling up is not tried every second.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import threading
import time
import zlib
from collections import Counter, OrderedDict
from pathlib import Path
from typing import cast

import mlx.core as mx

log = logging.getLogger(__name__)

FORMAT = "mlxserve-kv-block-2"
STAGING = ".tmp.safetensors"
MAX_QUEUED_BYTES = 256 * 2**20
MAX_FAILURES_IN_A_ROW = 3
# Failures that will repeat for every later write: stop writing at the first one.
STOP_WRITING = frozenset({"ENOSPC", "EDQUOT", "EROFS", "EACCES", "EPERM"})
# Writes (or the whole tier) turned off by a fault are tried again after this long, the wait
# doubling after each try that fails, up to the most.
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 300.0

BlockData = list[tuple[mx.array, mx.array]]
ArraySpec = tuple[tuple[int, ...], mx.Dtype]
BlockSpec = list[tuple[ArraySpec, ArraySpec]]


def checksum(arrays: list[mx.array]) -> str:
    """CRC-32 of evaluated, contiguous arrays (the runner copies blocks out so, mx.load gives
    them so): reading their buffers starts no MLX work, on whichever thread."""
    # Guards against truncated or damaged files, not against tampering: CRC-32 is enough and
    # several times faster than a cryptographic hash over hundreds of MB of KV.
    crc = 0
    for array in arrays:
        # mx.array has the buffer protocol, but its stub does not declare it
        crc = zlib.crc32(memoryview(array).cast("B"), crc)  # type: ignore[arg-type]
    return f"{crc:08x}"


def block_spec(data: BlockData) -> BlockSpec:
    """The shape and dtype of each layer's keys and values."""
    return [((tuple(k.shape), k.dtype), (tuple(v.shape), v.dtype)) for k, v in data]


def _seconds(value: float) -> str:
    return f"{value:.3g} s"


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, "OSError")
    return type(exc).__name__


class DiskTier:
    """KV blocks on disk for one model stage, bounded in size, least recently used out first.

    Blocks are written by a thread of their own, so the engine never waits for the disk; a
    writer more than ``max_queued_bytes`` behind drops blocks (counted in ``dropped_writes``)
    rather than holding them all in memory.

    A fault that turns the tier or its writes off is retried: see the module's docstring
    (``retry_first_s``, ``retry_max_s``).
    """

    def __init__(
        self,
        root: Path,
        model_key: str,
        layers: range,
        block_size: int,
        max_bytes: int,
        max_queued_bytes: int = MAX_QUEUED_BYTES,
        retry_first_s: float = RETRY_FIRST_S,
        retry_max_s: float = RETRY_MAX_S,
        parts: int | None = None,
    ) -> None:
        self.folder = Path(root).expanduser() / model_key
        self.meta = {
            "format": FORMAT,
            "model": model_key,
            "layers": f"{layers.start}-{layers.stop - 1}",
            "block_size": str(block_size),
        }
        # Key and value arrays per block: one pair per layer, or per plain cache of a
        # composite layer cache.
        self.num_layers = len(layers) if parts is None else parts
        if parts is not None and parts != len(layers):
            self.meta["parts"] = str(parts)
        self.block_size = block_size
        self.max_bytes = max_bytes
        self.max_queued_bytes = max_queued_bytes
        self.reads = self.writes = self.dropped_writes = self.rejected = 0
        self.write_retries = 0
        self.failures: Counter[str] = Counter()
        self.reading = self.writing = True
        self.retry_first_s = retry_first_s
        self.retry_max_s = max(retry_max_s, retry_first_s)
        self._retry_delay = retry_first_s  # the wait before the next try, while off
        self._retry_at: float | None = None  # when a block may try again, while off
        self._probing = False  # a block that tries again is on its way
        self._off_since = 0.0
        self._retries_while_off = 0
        self._resumed_at: float | None = None
        self.index: OrderedDict[str, int] = OrderedDict()
        self.total_bytes = 0
        self._lock = threading.Lock()
        self._pending: set[str] = set()
        self._queued_bytes = 0
        self._failures_in_a_row = 0
        self._unwritten = 0
        self._unwritten_at_close: int | None = None
        self._queue: queue.SimpleQueue[tuple[str, BlockData, int, bool] | None] = (
            queue.SimpleQueue()
        )
        self._open()
        self._writer = threading.Thread(
            target=self._write_forever, name="mlxserve-kv-disk", daemon=True
        )
        self._writer.start()

    def _open(self) -> None:
        try:
            found = self._scan()
        except OSError as exc:
            with self._lock:
                self._fail(_error_kind(exc), exc, reads_too=True)
            return
        with self._lock:
            leftovers = self._index_found(found)
        for leftover in leftovers:
            try:
                leftover.unlink(missing_ok=True)
            except OSError as exc:
                with self._lock:
                    self._fail(_error_kind(exc), exc)
                return

    def _scan(self) -> list[tuple[os.stat_result, Path]]:
        """Make the folder and list its block files (no lock needed: touches no state)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        return [(p.stat(), p) for p in self.folder.glob("*.safetensors")]

    def _index_found(self, found: list[tuple[os.stat_result, Path]]) -> list[Path]:
        """Index the blocks found, oldest first; the files of writes cut short. Lock held."""
        stored = sorted((s.st_mtime, p.stem, s.st_size) for s, p in found)
        self.index.clear()
        self.index.update((stem, size) for _, stem, size in stored if not stem.endswith(".tmp"))
        self.total_bytes = sum(self.index.values())
        return [p for _, p in found if p.name.endswith(STAGING)]

    @property
    def enabled(self) -> bool:
        """Whether the tier both reads and writes (a disk fault turns either off)."""
        return self.reading and self.writing

    def _path(self, block_hash: str) -> Path:
        return self.folder / f"{block_hash}.safetensors"

    def _fail(self, kind: str, exc: BaseException, reads_too: bool = False) -> None:
        """Count a disk failure; turn writes (and reads) off if it will repeat. Lock held."""
        self.failures[kind] += 1
        self._failures_in_a_row += 1
        stop = kind in STOP_WRITING or self._failures_in_a_row >= MAX_FAILURES_IN_A_ROW
        if reads_too and self.reading:
            self.reading = False
            delay = self._turn_writes_off()
            log.warning(
                "KV disk tier %s is off: %s; trying again in %s (then backing off up to %s)",
                self.folder,
                exc,
                _seconds(delay),
                _seconds(self.retry_max_s),
            )
        elif stop and self.writing:
            delay = self._turn_writes_off()
            log.warning(
                "KV disk tier %s: writes are off (%s: %s); trying again in %s "
                "(then backing off up to %s)",
                self.folder,
                kind,
                exc,
                _seconds(delay),
                _seconds(self.retry_max_s),
            )
        elif self.failures[kind] == 1:
            log.warning("KV disk tier %s: %s: %s", self.folder, kind, exc)

    def _turn_writes_off(self) -> float:
        """Turn writes off until a later try; the wait before it. Lock held."""
        now = time.monotonic()
        if self._resumed_at is not None and now - self._resumed_at < self.retry_max_s:
            self._retry_delay = min(self._retry_delay * 2, self.retry_max_s)  # it came back
        else:
            self._retry_delay = self.retry_first_s
        self.writing = False
        self._off_since, self._retries_while_off = now, 0
        self._retry_at = now + self._retry_delay
        return self._retry_delay

    def _retry_failed(self, kind: str, exc: BaseException) -> None:
        """A try while off failed: wait twice as long (up to the most). Lock held."""
        self._probing = False
        self._retry_delay = min(self._retry_delay * 2, self.retry_max_s)
        self._retry_at = time.monotonic() + self._retry_delay
        log.debug(
            "KV disk tier %s: still failing (%s: %s); trying again in %s",
            self.folder,
            kind,
            exc,
            _seconds(self._retry_delay),
        )

    def _resume(self) -> None:
        """A try while off worked: writes are back on. Lock held."""
        now = time.monotonic()
        self.writing, self._probing, self._retry_at = True, False, None
        self._failures_in_a_row = 0
        self._resumed_at = now
        tries = self._retries_while_off
        log.info(
            "KV disk tier %s: writes are back on (off for %s, %d %s)",
            self.folder,
            _seconds(now - self._off_since),
            tries,
            "try" if tries == 1 else "tries",
        )

    def _may_retry(self) -> bool:
        """Whether a block may try writing while writes are off. Lock held."""
        return (
            not self._probing and self._retry_at is not None and time.monotonic() >= self._retry_at
        )

    def has(self, block_hash: str) -> bool:
        with self._lock:
            return self.reading and block_hash in self.index

    def write(self, block_hash: str, data: BlockData, *, even_if_behind: bool = False) -> bool:
        """Queue a block (evaluated arrays) to be written; returns at once. Whether it was
        queued: not if it is on disk or queued already, if writes are off (unless it is time to
        try them again: then this block is the try) or closed, or if the writer is
        ``max_queued_bytes`` behind (unless ``even_if_behind``: for blocks the caller holds in
        memory anyway)."""
        size = sum(k.nbytes + v.nbytes for k, v in data)
        with self._lock:
            if block_hash in self.index:
                self.index.move_to_end(block_hash)
                return False
            if block_hash in self._pending or self._unwritten_at_close is not None:
                return False
            retry = not self.writing
            if retry and not self._may_retry():
                return False
            behind = self._queued_bytes and self._queued_bytes + size > self.max_queued_bytes
            if behind and not even_if_behind:
                self.dropped_writes += 1
                return False
            if retry:
                self._probing = True
                self.write_retries += 1
                self._retries_while_off += 1
            self._pending.add(block_hash)
            self._queued_bytes += size
        self._queue.put((block_hash, data, size, retry))
        return True

    def close(self, timeout_s: float) -> bool:
        """Write what is queued, waiting up to ``timeout_s``, then stop the writer thread.

        Returns:
            True if every block queued before the call was written.
        """
        with self._lock:
            if self._unwritten_at_close is None:
                self._unwritten_at_close = self._unwritten
                self._queue.put(None)
        self._writer.join(timeout_s)
        with self._lock:
            return not self._writer.is_alive() and self._unwritten == self._unwritten_at_close

    def _write_forever(self) -> None:
        while (item := self._queue.get()) is not None:
            block_hash, data, size, retry = item
            written = None
            if retry:
                written = self._retry(block_hash, data, size)
            elif self.writing:
                written = self._write_file(block_hash, data, size)
            with self._lock:
                self._pending.discard(block_hash)
                self._queued_bytes -= size
                if written is None:
                    self._unwritten += 1
                else:
                    self.index[block_hash] = written
                    self.total_bytes += written
                    self.writes += 1
                    self._failures_in_a_row = 0
                    self._shrink()

    def _retry(self, block_hash: str, data: BlockData, size: int) -> int | None:
        """Try whether the disk takes this block now that writes are off (opening the folder
        first if that had failed); on the writer thread."""
        if not self.reading:
            try:
                found = self._scan()
            except OSError as exc:
                with self._lock:
                    self._retry_failed(_error_kind(exc), exc)
                return None
            with self._lock:
                leftovers = self._index_found(found)
                self.reading = True
                log.info("KV disk tier %s: reads are back on", self.folder)
            for leftover in leftovers:  # a failure here shows in the write below
                with contextlib.suppress(OSError):
                    leftover.unlink(missing_ok=True)
        written = self._write_file(block_hash, data, size, retry=True)
        if written is not None:
            with self._lock:
                self._resume()
        return written

    def _write_file(
        self, block_hash: str, data: BlockData, size: int, retry: bool = False
    ) -> int | None:
        path = self._path(block_hash)
        staging = path.with_name(block_hash + STAGING)
        try:
            arrays = {
                f"{kind}.{layer}": array
                for layer, pair in enumerate(data)
                for kind, array in zip("kv", pair, strict=True)
            }
            meta = {**self.meta, "checksum": checksum(list(arrays.values()))}
            mx.save_safetensors(str(staging), arrays, metadata=meta)
            os.replace(staging, path)
            return path.stat().st_size
        except Exception as exc:  # the writer must outlive every failure
            kind = self._diagnose(exc, size)
            with contextlib.suppress(OSError):  # left for the next start to remove
                staging.unlink(missing_ok=True)
            with self._lock:
                if retry:
                    self._retry_failed(kind, exc)
                else:
                    self._fail(kind, exc)
            return None

    def _diagnose(self, exc: Exception, size: int) -> str:
        """Why a write failed. MLX's errors name no errno, so ask the file system (before the
        partial file is removed: it is what filled the disk)."""
        if isinstance(exc, OSError):
            return _error_kind(exc)
        try:
            stats = os.statvfs(self.folder)
        except OSError as probe:  # e.g. the folder is gone
            return _error_kind(probe)
        if stats.f_flag & os.ST_RDONLY:
            return "EROFS"
        if not os.access(self.folder, os.W_OK | os.X_OK):
            return "EACCES"
        if stats.f_bavail * stats.f_frsize < size:
            return "ENOSPC"
        return type(exc).__name__

    def read(self, block_hash: str, expected: BlockSpec | None = None) -> BlockData | None:
        """The block's arrays, or None (and the file gone) if it is not what the reader needs.

        Args:
            block_hash: the block's content hash.
            expected: each layer's keys and values shape and dtype, as the model's cache
                holds them for one block; None checks only the layers and the token axis.
        """
        if not self.reading:
            return None
        path = self._path(block_hash)
        try:
            loaded = mx.load(str(path), return_metadata=True)  # (arrays, safetensors metadata)
            arrays, meta = cast("tuple[dict[str, mx.array], dict[str, str]]", loaded)
            data, problem = self._check(arrays, meta, expected)
        except Exception as exc:  # a stale or corrupt file is never used
            data, problem = None, str(exc)
        with self._lock:
            if data is None:
                log.warning("ignoring KV block file %s: %s", path.name, problem)
                self.rejected += 1
                self._drop(block_hash)
                return None
            if block_hash in self.index:
                self.index.move_to_end(block_hash)
            self.reads += 1
            if not self.writing:
                return data
        try:
            os.utime(path)  # for the LRU order after a restart
        except OSError as exc:
            with self._lock:
                self._fail(_error_kind(exc), exc)
        return data

    def _check(
        self, arrays: dict[str, mx.array], meta: dict[str, str], expected: BlockSpec | None
    ) -> tuple[BlockData | None, str]:
        names = [f"{kind}.{layer}" for layer in range(self.num_layers) for kind in "kv"]
        if sorted(arrays) != sorted(names):
            return None, f"{len(arrays)} arrays, not the keys and values of {self.num_layers}"
        data = [(arrays[f"k.{i}"], arrays[f"v.{i}"]) for i in range(self.num_layers)]
        if meta != {**self.meta, "checksum": checksum([arrays[name] for name in names])}:
            return None, "metadata or checksum does not match"
        for array in (a for pair in data for a in pair):
            if array.ndim != 4 or array.shape[0] != 1 or array.shape[2] != self.block_size:
                return None, f"an array of shape {array.shape}, not one block of one sequence"
        if expected is not None and block_spec(data) != expected:
            return None, "shapes or dtypes differ from the model's KV cache"
        return data, ""

    def _drop(self, block_hash: str) -> None:
        self.total_bytes -= self.index.pop(block_hash, 0)
        try:
            self._path(block_hash).unlink(missing_ok=True)
        except OSError as exc:  # out of the index, it is never read again anyway
            self._fail(_error_kind(exc), exc)

    def _shrink(self) -> None:
        while self.total_bytes > self.max_bytes and len(self.index) > 1:
            oldest = next(iter(self.index))
            self._drop(oldest)
