"""Fingerprints of checkpoints: they change when any weight byte changes.

Weight files are hashed by content, in chunks; the hashes are remembered by (path, size,
mtime) in a small JSON file, so a restart does not read gigabytes again. A snapshot in the
Hugging Face cache is named by its commit, which stands in for the contents of its files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

WEIGHT_HASHES_FILE = "weight-hashes.json"
CHUNK_BYTES = 2**22


def checkpoint_fingerprint(name: str, path: Path, hash_cache: Path | None = None) -> str:
    """A digest of ``name``, the checkpoint's config.json and its weight files' contents.

    Only hex digits: the disk tier names a folder after it, and no path is built from a name.

    Args:
        name: the model's name (part of the fingerprint).
        path: the checkpoint folder.
        hash_cache: the JSON file that remembers weight hashes; None hashes every time.
    """
    digest = hashlib.blake2b(digest_size=12)
    digest.update(name.encode())
    digest.update((path / "config.json").read_bytes())
    commit = hub_commit(path)
    hashes = WeightHashes(hash_cache)
    for weights in sorted(path.glob("*.safetensors")):
        identity = f"commit {commit}" if commit else hashes.of(weights)
        digest.update(f"{weights.name}:{identity}".encode())
    hashes.save()
    return digest.hexdigest()


def hub_commit(path: Path) -> str | None:
    """The commit of a Hugging Face cache snapshot (``models--org--repo/snapshots/<commit>``)."""
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.name
    return None


def content_hash(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with path.open("rb") as file:
        while chunk := file.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


class WeightHashes:
    """Content hashes of files, remembered by (path, size, mtime_ns) in a JSON file.

    The file is a cache: one that is missing, corrupt or unwritable only costs rehashing.
    """

    def __init__(self, file: Path | None) -> None:
        self.file = file
        self.entries = self._load()
        self.changed = False

    def _load(self) -> dict[str, Any]:
        if self.file is None:
            return {}
        try:
            entries = json.loads(self.file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring the weight hash cache %s: %s", self.file, exc)
            return {}
        return entries if isinstance(entries, dict) else {}

    def known(self, path: Path) -> str | None:
        """The remembered content hash of ``path`` if its size and mtime still match, else None
        (reads no more than the file's metadata)."""
        stat = path.stat()
        known = self.entries.get(str(path.resolve()))
        if (
            isinstance(known, dict)
            and known.get("size") == stat.st_size
            and known.get("mtime_ns") == stat.st_mtime_ns
            and isinstance(known.get("blake2b"), str)
        ):
            return known["blake2b"]
        return None

    def of(self, path: Path) -> str:
        """The content hash of ``path``, from the cache if its size and mtime match."""
        remembered = self.known(path)
        if remembered is not None:
            return remembered
        key, stat = str(path.resolve()), path.stat()
        value = content_hash(path)
        self.entries[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "blake2b": value}
        self.changed = True
        return value

    def save(self) -> None:
        """Write the cache if it changed (atomically); a failure is only logged."""
        if self.file is None or not self.changed:
            return
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            handle, staging = tempfile.mkstemp(dir=self.file.parent, suffix=".tmp")
            try:
                with os.fdopen(handle, "w", encoding="utf-8") as out:
                    json.dump(self.entries, out, indent=1, sort_keys=True)
                os.replace(staging, self.file)
            except BaseException:
                os.unlink(staging)
                raise
        except OSError as exc:
            log.warning("could not write the weight hash cache %s: %s", self.file, exc)
        self.changed = False
