"""Where checkpoints live on disk: built-in models, local folders and GGUF files, the Hugging
Face cache."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlxserve.core.config.schema import source_kind
from mlxserve.core.errors import HubUnavailableError, MlxserveError, ModelNotFoundError
from mlxserve.plugins.families.generic import ANY_MODEL_TYPE
from mlxserve.plugins.tiny import RANDOM_WEIGHTS_NOTE, is_tiny_checkpoint, write_tiny_checkpoint
from mlxserve.plugins.tiny_configs import TINY_CONFIGS
from mlxserve.registry.fingerprint import WEIGHT_HASHES_FILE, WeightHashes
from mlxserve.registry.gguf_checkpoint import (
    converting_family,
    gguf_file_of,
    write_gguf_checkpoint,
)
from mlxserve.registry.packaged import PACKAGED_MODELS
from mlxserve.registry.plugins import Plugins

BUILTIN_PREFIX = "builtin:"
TINY_PREFIX = "tiny-"
GGUF_DIR = "gguf"
GGUF_CONVERSION = 2  # part of a converted folder's name: bump it when conversions change
METADATA_FILES = ["*.json", "*.jinja", "tokenizer.model", "*.tiktoken", "*.txt"]
HUB_FILES = [*METADATA_FILES, "*.safetensors"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelStatus:
    """Whether a source's checkpoint is on disk, where, and its size there."""

    cached: bool
    path: Path | None = None
    size_bytes: int = 0


def disk_size(path: Path) -> int:
    """Bytes of the file ``path``, or of the files under it (0 if missing), following the HF
    cache's blob links."""
    if path.is_file():
        return path.stat().st_size
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


class ModelStore:
    """Finds (and writes or downloads) the folder of a model entry's checkpoint."""

    def __init__(self, cache_dir: Path, plugins: Plugins) -> None:
        self.cache_dir = Path(cache_dir).expanduser()
        self.plugins = plugins

    def builtin_names(self) -> list[str]:
        """Every ``builtin:`` name: packaged real models, and ``tiny-FAMILY`` and
        ``tiny-MODEL_TYPE`` for each family."""
        names = set(PACKAGED_MODELS)
        for entry in self.plugins.families:
            types = entry.family.model_types
            if ANY_MODEL_TYPE in types:  # the generic family: the tiny types nobody claims
                types = tuple(t for t in TINY_CONFIGS if self.plugins.family_for(t) is entry.family)
            else:
                names.add(TINY_PREFIX + entry.family.name)
            names.update(TINY_PREFIX + t for t in types)
        return sorted(names)

    def locate(
        self,
        source: str,
        *,
        revision: str | None = None,
        download: bool = False,
        family: str | None = None,
    ) -> Path:
        """The checkpoint folder of a ``source`` (``builtin:NAME``, a local path or a repo id).

        Built-in tiny checkpoints are written on first use, GGUF files converted on first use
        (by ``family`` if it converts their architecture). Hub checkpoints come from the local
        Hugging Face cache, and are downloaded first when ``download`` is set.
        """
        kind = source_kind(source)
        if kind == "builtin":
            return self.builtin(source.removeprefix(BUILTIN_PREFIX), family)
        if kind == "local":
            path = Path(source).expanduser()
            gguf = gguf_file_of(path)
            return self.gguf(gguf, family) if gguf else _checkpoint_folder(path, source)
        return self.hub(source, revision=revision, download=download)

    def builtin(self, name: str, family: str | None = None) -> Path:
        """The folder of a built-in model: a package's GGUF file converted, or a tiny
        checkpoint written, atomically on first use."""
        if name in PACKAGED_MODELS:
            return self.gguf(PACKAGED_MODELS[name].locate(), family)
        if name not in self.builtin_names():
            raise ModelNotFoundError(
                f"builtin:{name} is not a built-in model (have: "
                + ", ".join(f"builtin:{n}" for n in self.builtin_names())
                + ")"
            )
        path = self._builtin_dir(name)
        if (path / "config.json").is_file():
            return path
        kind = name.removeprefix(TINY_PREFIX)
        matches = [e.family for e in self.plugins.families if kind == e.family.name]
        tiny_family = matches[0] if matches else self.plugins.family_for(kind)
        _write_atomically(
            path,
            lambda staging: write_tiny_checkpoint(
                tiny_family, staging, model_type=None if matches else kind
            ),
        )
        return path

    def gguf_file(self, source: str) -> Path | None:
        """The GGUF file a source names (a packaged built-in one, or a local file or a folder
        holding one), or None; converts nothing."""
        kind = source_kind(source)
        if kind == "builtin":
            packaged = PACKAGED_MODELS.get(source.removeprefix(BUILTIN_PREFIX))
            return packaged.locate() if packaged else None
        return gguf_file_of(Path(source).expanduser()) if kind == "local" else None

    def gguf(self, gguf_path: Path, family: str | None = None) -> Path:
        """The MLX checkpoint converted from a GGUF file, converted atomically on first use
        into ``cache_dir``/gguf/NAME-KEY (KEY: the file's contents and ``family``). A file of
        an architecture no family converts is refused before it is read (or hashed)."""
        converting_family(gguf_path, self.plugins, family)
        path = self._gguf_dir(gguf_path, family)
        if not (path / "config.json").is_file():
            log.info("converting %s into %s", gguf_path, path)
            _write_atomically(
                path,
                lambda staging: write_gguf_checkpoint(gguf_path, staging, self.plugins, family),
            )
        return path

    def _gguf_dir(self, gguf_path: Path, family: str | None) -> Path:
        """The converted folder of a GGUF file (its content hash is read unless remembered)."""
        hashes = WeightHashes(self.cache_dir / WEIGHT_HASHES_FILE)
        contents = hashes.of(gguf_path)
        hashes.save()
        return self._gguf_dir_of(gguf_path, family, contents)

    def _known_gguf_dir(self, gguf_path: Path, family: str | None) -> Path | None:
        """The converted folder of a GGUF file, or None unless its content hash is remembered
        already (listing models must never read a whole file)."""
        contents = WeightHashes(self.cache_dir / WEIGHT_HASHES_FILE).known(gguf_path)
        return None if contents is None else self._gguf_dir_of(gguf_path, family, contents)

    def _gguf_dir_of(self, gguf_path: Path, family: str | None, contents: str) -> Path:
        key = hashlib.blake2b(f"{contents} {family} {GGUF_CONVERSION}".encode(), digest_size=6)
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", gguf_path.stem)[:64]
        return self.cache_dir / GGUF_DIR / f"{stem}-{key.hexdigest()}"

    def hub(
        self,
        repo_id: str,
        *,
        revision: str | None = None,
        download: bool = False,
        progress: bool = True,
        weight_files: Sequence[str] | None = None,
    ) -> Path:
        """The local snapshot of a Hugging Face repo (downloaded first if ``download``).

        ``weight_files`` limits the safetensors files to those named (config and tokenizer
        files always come along); None takes them all.
        """
        import httpx2
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        try:
            return Path(
                snapshot_download(
                    repo_id,
                    revision=revision,
                    allow_patterns=HUB_FILES
                    if weight_files is None
                    else [*METADATA_FILES, *weight_files],
                    local_files_only=not download,
                    tqdm_class=None if progress else _quiet_tqdm(),
                )
            )
        except RevisionNotFoundError as exc:
            raise ModelNotFoundError(
                f"{repo_id}: the Hugging Face hub has no revision {revision!r} of it"
            ) from exc
        except RepositoryNotFoundError as exc:  # also gated repos
            raise ModelNotFoundError(
                f"{repo_id}: not on the Hugging Face hub or not allowed ({_reason(exc)}); "
                f"check the name, or log in (`hf auth login`) if it is private or gated"
            ) from exc
        except LocalEntryNotFoundError as exc:
            if not download:
                raise ModelNotFoundError(
                    f"{repo_id} is not in the local Hugging Face cache; "
                    f"download it with `mlxserve models pull`"
                ) from exc
            raise _hub_unavailable(repo_id, exc) from exc
        except (HfHubHTTPError, httpx2.TransportError) as exc:  # failed mid-download
            raise _hub_unavailable(repo_id, exc) from exc

    def pull(
        self,
        repo_id: str,
        revision: str | None = None,
        *,
        retries: int = 3,
        backoff: float = 1.0,
        progress: bool = True,
    ) -> Path:
        """Download a Hugging Face repo into its cache, retrying while the hub is unavailable.

        Waits ``backoff``, then twice as long, and so on, between attempts. A repo the hub
        does not have is reported at once (ModelNotFoundError), without retrying.
        """
        from huggingface_hub import is_offline_mode

        if is_offline_mode():
            raise _hub_unavailable(repo_id, None)
        for attempt in range(retries):
            try:
                return self.hub(repo_id, revision=revision, download=True, progress=progress)
            except HubUnavailableError as exc:
                delay = backoff * 2**attempt
                why = f"{repo_id}: hub unavailable ({_reason(exc)})"
                log.warning("%s; retry %d/%d in %.1f s", why, attempt + 1, retries, delay)
                time.sleep(delay)
        return self.hub(repo_id, revision=revision, download=True, progress=progress)

    def status(
        self, source: str, revision: str | None = None, *, family: str | None = None
    ) -> ModelStatus:
        """Whether a source's checkpoint is on disk (for a GGUF source: its converted folder,
        else the file); writes nothing and never uses the network."""
        try:
            gguf = self.gguf_file(source)
            if gguf is not None:
                converted = self._known_gguf_dir(gguf, family)
                if converted is not None and (converted / "config.json").is_file():
                    path = converted
                else:
                    path = gguf
            elif source_kind(source) == "builtin":
                path = _checkpoint_folder(self._builtin_dir(source), source)
            else:
                path = self.locate(source, revision=revision)
        except ModelNotFoundError:
            return ModelStatus(cached=False)
        return ModelStatus(cached=True, path=path, size_bytes=disk_size(path))

    def random_weights(self, source: str) -> bool:
        """Whether a source is a tiny random-weight checkpoint (it talks gibberish)."""
        kind = source_kind(source)
        if kind == "builtin":
            return source.removeprefix(BUILTIN_PREFIX).startswith(TINY_PREFIX)
        return kind == "local" and is_tiny_checkpoint(Path(source).expanduser())

    def description(self, source: str, family: str | None = None) -> str | None:
        """What a built-in or local model is, when mlxserve knows (for a GGUF file: its name,
        size and type once converted); never uses the network."""
        kind = source_kind(source)
        name = source.removeprefix(BUILTIN_PREFIX)
        if kind == "builtin" and name in PACKAGED_MODELS:
            return PACKAGED_MODELS[name].description
        if self.random_weights(source):
            return f"tiny checkpoint with {RANDOM_WEIGHTS_NOTE}"
        status = self.status(source, family=family) if kind == "local" else None
        if status is None or status.path is None or not status.path.is_dir():
            return None
        try:
            config = json.loads((status.path / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return config.get("mlxserve", {}).get("description")

    def remove(self, source: str, revision: str | None = None, *, family: str | None = None) -> int:
        """Delete a built-in or hub checkpoint, or a GGUF file's converted copy, from disk; the
        bytes freed (0 if not there).

        A hub repo loses every cached revision, or only ``revision`` (a branch, tag or commit).
        """
        kind = source_kind(source)
        try:
            gguf = self.gguf_file(source)
        except ModelNotFoundError:
            gguf = None
        if gguf is not None:
            path = self._gguf_dir(gguf, family)
        elif kind == "local":
            raise MlxserveError(
                f"{source}: local models are not managed by mlxserve; delete the folder yourself"
            )
        elif kind == "hub":
            return _remove_from_hf_cache(source, revision)
        else:
            path = self._builtin_dir(source)
        size = disk_size(path)
        shutil.rmtree(path, ignore_errors=True)
        return size

    def _builtin_dir(self, name: str) -> Path:
        name = name.removeprefix(BUILTIN_PREFIX)
        if name in ("", ".", "..") or Path(name).name != name:
            raise ModelNotFoundError(f"builtin:{name} is not a built-in model name")
        return self.cache_dir / "builtin" / name


def _write_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """Have ``write`` fill a staging folder beside ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        write(staging)
        try:
            os.rename(staging, path)
        except OSError:  # another process wrote it first
            if not (path / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _checkpoint_folder(path: Path, source: str) -> Path:
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{source}: no config.json there (is it a checkpoint?)")
    return path


def _remove_from_hf_cache(repo_id: str, revision: str | None) -> int:
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        cache = scan_cache_dir()
    except CacheNotFound:
        return 0
    hashes = [
        rev.commit_hash
        for repo in cache.repos
        if repo.repo_type == "model" and repo.repo_id == repo_id
        for rev in repo.revisions
        if revision in (None, rev.commit_hash, *rev.refs)
    ]
    if not hashes:
        return 0
    strategy = cache.delete_revisions(*hashes)
    strategy.execute()
    return strategy.expected_freed_size


def _hub_unavailable(repo_id: str, cause: BaseException | None) -> HubUnavailableError:
    from huggingface_hub import constants, is_offline_mode

    if is_offline_mode():
        return HubUnavailableError(
            f"{repo_id}: cannot download it, Hugging Face offline mode is on (HF_HUB_OFFLINE=1); "
            f"unset HF_HUB_OFFLINE to download"
        )
    return HubUnavailableError(
        f"{repo_id}: the Hugging Face hub cannot be reached and the model is not cached "
        f"({_reason(cause)}); check the network and HF_ENDPOINT (now {constants.ENDPOINT}), "
        f"or point the entry's source at a local folder"
    )


def _reason(exc: BaseException | None) -> str:
    """The root cause of a huggingface_hub error, in one line."""
    while exc is not None and exc.__cause__ is not None:
        exc = exc.__cause__
    response = getattr(exc, "response", None)
    if response is not None:
        return f"HTTP {response.status_code}"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _quiet_tqdm() -> type[Any]:
    from tqdm.auto import tqdm

    class Quiet(tqdm):  # type: ignore[misc]  # tqdm has no types: it is Any to mypy
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **{**kwargs, "disable": True})

    return Quiet
