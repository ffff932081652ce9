"""``mlxserve models ...``: the checkpoints behind the registry's names."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mlxserve.core.config import Config
from mlxserve.registry.plugins import load_plugins


def cmd_models_tiny(args: argparse.Namespace, config: Config) -> int:
    from mlxserve.plugins.tiny import RANDOM_WEIGHTS_NOTE, write_tiny_checkpoint

    family = load_plugins(config.plugins.enabled).family(args.family)
    path = write_tiny_checkpoint(family, args.dir, model_type=args.model_type, seed=args.seed)
    print(f"wrote a tiny {family.name} checkpoint to {path} ({RANDOM_WEIGHTS_NOTE})")
    return 0


def add_models_commands(commands: Any) -> None:
    """Add ``models`` and its actions to the top-level subcommand parser."""
    models = commands.add_parser("models", help="model checkpoints")
    actions = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    tiny = actions.add_parser("tiny", help="write a tiny random-weight checkpoint")
    tiny.add_argument("family", help="a family name, e.g. llama, qwen, mistral, deepseek")
    tiny.add_argument("dir", type=Path, help="folder to write")
    tiny.add_argument("--model-type", help="which of the family's model types")
    tiny.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    tiny.set_defaults(func=cmd_models_tiny)
