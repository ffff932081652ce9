"""Where checkpoints live on disk: built-in tiny models, local folders, the Hugging Face cache."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from mlxserve.core.errors import HubUnavailableError, ModelNotFoundError
from mlxserve.plugins.tiny import write_tiny_checkpoint

from .plugins import Plugins

BUILTIN_PREFIX = "builtin:"
TINY_PREFIX = "tiny-"
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.tiktoken", "*.txt"]


class ModelStore:
    """Finds (and writes or downloads) the folder of a model entry's checkpoint."""

    def __init__(self, cache_dir: Path, plugins: Plugins) -> None:
        self.cache_dir = Path(cache_dir).expanduser()
        self.plugins = plugins

    def builtin_names(self) -> list[str]:
        """Every ``builtin:`` name: ``tiny-FAMILY`` and ``tiny-MODEL_TYPE`` for each family."""
        names = set()
        for entry in self.plugins.families:
            names.add(TINY_PREFIX + entry.family.name)
            names.update(TINY_PREFIX + t for t in entry.family.model_types)
        return sorted(names)

    def locate(self, source: str, *, revision: str | None = None, download: bool = False) -> Path:
        """The checkpoint folder of a ``source`` (``builtin:NAME``, a local path or a repo id).

        Built-in checkpoints are written on first use. Hub checkpoints come from the local
        Hugging Face cache, and are downloaded first when ``download`` is set.
        """
        if source.startswith(BUILTIN_PREFIX):
            return self.builtin(source.removeprefix(BUILTIN_PREFIX))
        if source.startswith(("/", "./", "../", "~")):
            path = Path(source).expanduser()
            if not (path / "config.json").is_file():
                raise ModelNotFoundError(f"{source}: no config.json there (is it a checkpoint?)")
            return path
        return self.hub(source, revision=revision, download=download)

    def builtin(self, name: str) -> Path:
        """The folder of a built-in tiny checkpoint, written atomically on first use."""
        if name not in self.builtin_names():
            raise ModelNotFoundError(
                f"builtin:{name} is not a built-in model (have: "
                + ", ".join(f"builtin:{n}" for n in self.builtin_names())
                + ")"
            )
        path = self.cache_dir / "builtin" / name
        if (path / "config.json").is_file():
            return path
        kind = name.removeprefix(TINY_PREFIX)
        matches = [e.family for e in self.plugins.families if kind == e.family.name]
        family = matches[0] if matches else self.plugins.family_for(kind)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=path.parent))
        try:
            write_tiny_checkpoint(family, staging, model_type=None if matches else kind)
            try:
                os.rename(staging, path)
            except OSError:  # another process wrote it first
                if not (path / "config.json").is_file():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return path

    def hub(self, repo_id: str, *, revision: str | None = None, download: bool = False) -> Path:
        """The local snapshot of a Hugging Face repo (downloaded first if ``download``)."""
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
        )

        try:
            return Path(
                snapshot_download(
                    repo_id,
                    revision=revision,
                    allow_patterns=HUB_FILES,
                    local_files_only=not download,
                )
            )
        except (RepositoryNotFoundError, GatedRepoError) as exc:
            raise ModelNotFoundError(
                f"{repo_id}: not on the Hugging Face hub or not allowed: {exc}"
            ) from exc
        except LocalEntryNotFoundError as exc:
            if not download:
                raise ModelNotFoundError(
                    f"{repo_id} is not in the local Hugging Face cache; "
                    f"download it with `mlxserve models pull`"
                ) from exc
            raise HubUnavailableError(
                f"{repo_id}: the Hugging Face hub cannot be reached and the model is not "
                f"cached ({type(exc).__name__}); check the network or HF_ENDPOINT, "
                f"or point the entry's source at a local folder"
            ) from exc
