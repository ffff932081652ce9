"""``mlxserve models ...``: the checkpoints behind the registry's names."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlxserve.core.config.schema import Config

if TYPE_CHECKING:
    from mlxserve.registry.models import ModelRegistry

_PULLED = {
    "hub": "in the Hugging Face cache",
    "builtin": "built in",
    "local": "a local folder, nothing to download",
}


def _registry(config: Config) -> ModelRegistry:
    from mlxserve.registry.models import ModelRegistry
    from mlxserve.registry.plugins import load_plugins

    return ModelRegistry(config, load_plugins(config.plugins.enabled))


def human_size(size: int) -> str:
    """Bytes in decimal units, e.g. ``12.3 MB``."""
    units = ("B", "kB", "MB", "GB", "TB")
    power = 0
    while power < len(units) - 1 and round(size / 1000**power, 1) >= 1000:
        power += 1
    return f"{size} B" if power == 0 else f"{size / 1000**power:.1f} {units[power]}"


def cmd_models_tiny(args: argparse.Namespace, config: Config) -> int:
    from mlxserve.plugins.tiny import RANDOM_WEIGHTS_NOTE, write_tiny_checkpoint
    from mlxserve.registry.plugins import load_plugins

    family = load_plugins(config.plugins.enabled).family(args.family)
    path = write_tiny_checkpoint(family, args.dir, model_type=args.model_type, seed=args.seed)
    print(f"wrote a tiny {family.name} checkpoint to {path} ({RANDOM_WEIGHTS_NOTE})")
    return 0


def cmd_models_list(args: argparse.Namespace, config: Config) -> int:
    from mlxserve.plugins.tiny import is_tiny_checkpoint
    from mlxserve.server.cli.main import _table

    store = _registry(config).store
    rows = [["NAME", "ALIASES", "SOURCE", "FAMILY", "CACHED", "SIZE", "NOTE"]]
    for name, entry in config.models.items():
        status = store.status(entry.source, entry.revision, family=entry.family)
        source = f"{entry.source}@{entry.revision}" if entry.revision else entry.source
        tiny = store.random_weights(entry.source) or bool(
            status.path and status.path.is_dir() and is_tiny_checkpoint(status.path)
        )
        rows.append(
            [
                name,
                ", ".join(entry.aliases) or "-",
                source,
                entry.family or "auto",
                "yes" if status.cached else "no",
                human_size(status.size_bytes) if status.cached else "-",
                "random weights" if tiny else "",
            ]
        )
    print(_table(rows))
    return 0


def cmd_models_pull(args: argparse.Namespace, config: Config) -> int:
    from mlxserve.registry.store import disk_size

    registry = _registry(config)
    store = registry.store
    name, entry = config.resolve_model(args.name)
    if entry.source_kind == "hub":
        path = store.pull(
            entry.source, entry.revision, retries=args.retries, backoff=args.retry_delay
        )
    else:
        path = store.locate(entry.source, family=entry.family)
    gguf = store.gguf_file(entry.source)
    note = _PULLED[entry.source_kind] if gguf is None else f"converted from {gguf}"
    if store.random_weights(entry.source):
        note += ", random weights"
    print(f"{name}: {path} ({human_size(disk_size(path))}; {note})")
    return 0


def cmd_models_rm(args: argparse.Namespace, config: Config) -> int:
    registry = _registry(config)
    name, entry = config.resolve_model(args.name)
    freed = registry.store.remove(entry.source, entry.revision, family=entry.family)
    if freed and entry.source_kind == "local":
        print(f"{name}: removed the converted copy of {entry.source} ({human_size(freed)} freed)")
    elif freed:
        print(f"{name}: removed {entry.source} ({human_size(freed)} freed)")
    else:
        print(f"{name}: {entry.source} is not on disk, nothing to remove")
    return 0


def add_models_commands(commands: Any, common: argparse.ArgumentParser) -> None:
    """Add ``models`` and its actions (each taking ``common``'s options) to the CLI."""
    models = commands.add_parser("models", help="model checkpoints")
    actions = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    actions.add_parser(
        "list",
        parents=[common],
        help="registry models, where they come from, whether they are on disk",
    ).set_defaults(func=cmd_models_list)

    pull = actions.add_parser(
        "pull", parents=[common], help="download a registry model (or write a built-in one)"
    )
    pull.add_argument("name", help="a registry name or alias")
    pull.add_argument("--retries", type=int, default=3, help="retries while the hub is down")
    pull.add_argument(
        "--retry-delay", type=float, default=1.0, help="seconds before the first retry; doubles"
    )
    pull.set_defaults(func=cmd_models_pull)

    rm = actions.add_parser(
        "rm", parents=[common], help="delete a registry model's downloaded or built-in files"
    )
    rm.add_argument("name", help="a registry name or alias")
    rm.set_defaults(func=cmd_models_rm)

    tiny = actions.add_parser(
        "tiny", parents=[common], help="write a tiny random-weight checkpoint"
    )
    tiny.add_argument("family", help="a family name, e.g. llama, qwen, mistral, deepseek")
    tiny.add_argument("dir", type=Path, help="folder to write")
    tiny.add_argument("--model-type", help="which of the family's model types")
    tiny.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    tiny.set_defaults(func=cmd_models_tiny)
