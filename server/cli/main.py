"""The ``mlxserve`` command.

Nothing here imports MLX at the top: ``main`` calls ``prepare_mlx`` (core/cpu/startup.py) before
a command that computes or loads plugins runs, and each command imports what it needs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from mlxserve.core.config.schema import Config, ConfigError, dump_config, load_config
from mlxserve.core.errors import MlxserveError
from mlxserve.core.logs import setup_logging
from mlxserve.server.cli.models import add_models_commands

if TYPE_CHECKING:
    from mlxserve.registry.plugins import Plugins


def _plugins(config: Config) -> Plugins:
    from mlxserve.registry.plugins import load_plugins

    return load_plugins(config.plugins.enabled, trace=config.plugins.trace)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


# ---- config ----------------------------------------------------------------------------


def cmd_config_check(args: argparse.Namespace, config: Config) -> int:
    names = ", ".join(sorted(config.models))
    plural = "s" if len(config.models) != 1 else ""
    count = f"{len(config.models)} model{plural}"
    print(f"{args.file or 'configuration'}: OK ({count}: {names})")
    return 0


def cmd_config_show(args: argparse.Namespace, config: Config) -> int:
    print(dump_config(config, mask_secrets=True), end="")
    return 0


# ---- plugins ---------------------------------------------------------------------------


def cmd_plugins_list(args: argparse.Namespace, config: Config) -> int:
    plugins = _plugins(config)
    rows = [["FAMILY", "MODEL TYPES", "PLUGIN", "PACKAGE", "BUILT-IN"]]
    for entry in plugins.families:
        package = f"{entry.plugin.package} {entry.plugin.version}".strip()
        rows.append(
            [
                entry.family.name,
                ", ".join(entry.family.model_types).replace(
                    "*", "* (any other type mlx-lm builds)"
                ),
                entry.plugin.name,
                package,
                "yes" if entry.plugin.builtin else "no",
            ]
        )
    print(_table(rows))
    for info in plugins.infos:
        if info.error:
            print(f"\nplugin {info.name!r} ({info.package}) failed to load: {info.error}")
    return 0


# ---- serve ----------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace, config: Config) -> int:
    import logging

    from mlxserve.core.cpu.blas import load_fast_blas
    from mlxserve.core.distributed.cluster import Cluster
    from mlxserve.server.app import create_app
    from mlxserve.server.http.serving import Server

    cluster = Cluster.join(config.distributed.backend)
    if cluster.distributed:
        setup_logging(config.logging.level, config.logging.file, rank=cluster.rank)
        join_all_reduce(cluster, config)
    logging.getLogger("mlxserve.core.cpu.blas").info("%s", load_fast_blas().describe())
    if cluster.rank > 0:
        return follow_rank_zero(config, cluster)
    app = create_app(config, cluster=cluster)
    host = f"[{config.server.host}]" if ":" in config.server.host else config.server.host
    logging.getLogger(__name__).info("web page: http://%s:%d/ui", host, config.server.port)
    Server(
        app, host=config.server.host, port=config.server.port, log_level=config.logging.level
    ).run()
    return 0


def join_all_reduce(cluster: Any, config: Config) -> None:
    """Every rank at once: the all-reduce tensor-parallel layers sum their shares with."""
    from mlxserve.core.distributed.allreduce import connect, route_all_sums
    from mlxserve.core.distributed.ranks import STEP_CAP_FACTOR

    cluster.all_reduce = connect(
        cluster, silence_s=STEP_CAP_FACTOR * config.distributed.step_timeout_s
    )
    route_all_sums(cluster.all_reduce)


def follow_rank_zero(config: Config, cluster: Any) -> int:
    """Every rank but 0: run rank 0's steps on this rank's share of each model.

    Any failure ends the process at once with exit status 1 (after logging why).
    """
    import logging
    import os

    from mlxserve.core.distributed.ranks import follow, lost_a_rank
    from mlxserve.registry.models import ModelRegistry
    from mlxserve.server.app import engine_settings

    def end() -> None:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        # A rank out of step cannot go on, and nothing of it may keep the process alive: end
        # it now, so that mlx.launch stops the group and rank 0 sees its ring connection drop.
        os._exit(1)

    def cut_off(reason: str) -> None:  # the main thread may wait on the ring for good
        print(f"error: rank {cluster.rank} lost contact with rank 0: {reason}", file=sys.stderr)
        end()

    registry = ModelRegistry(config, _plugins(config), cluster)
    try:
        follow(
            cluster,
            lambda name: registry.load(name, download=True),
            engine_settings(config),
            on_lost=cut_off,
        )
    except Exception as exc:
        if lost_a_rank(exc):
            print(f"error: rank {cluster.rank} lost contact with rank 0: {exc}", file=sys.stderr)
        else:
            logging.getLogger(__name__).critical("rank %d failed", cluster.rank, exc_info=True)
        end()
    return 0


def cmd_launch(args: argparse.Namespace, config: Config) -> int:
    from mlxserve.server.cli.launch import run_launch

    return run_launch(config, getattr(args, "config", None), args.dry_run)


# ---- generate --------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace, config: Config) -> int:
    import asyncio

    from mlxserve.core.engine.engine import Engine
    from mlxserve.core.sampling.params import SamplingParams
    from mlxserve.registry.models import ModelRegistry
    from mlxserve.server.app import engine_settings

    registry = ModelRegistry(config, _plugins(config))
    name, _ = config.resolve_model(args.model)  # None: the default model
    engine = Engine(lambda model: registry.load(model, download=True), engine_settings(config))

    async def answer() -> None:
        model = await engine.model(name)
        if model.random_weights:
            print(f"[{name} has random weights: expect gibberish]", file=sys.stderr)
        messages = [{"role": "user", "content": args.prompt}]
        prompt = list(model.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
        async for output in engine.submit(model, prompt, params):
            if output.error:
                raise MlxserveError(output.error)
            print(output.text, end="", flush=True)
        print()

    engine.start()
    try:
        asyncio.run(answer())
    finally:
        engine.stop()
    return 0


# ---- parser ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlxserve", description="A plugin-based LLM inference server on MLX."
    )
    config_help = "mlxserve.toml to use (default: ./mlxserve.toml)"
    parser.add_argument("--config", help=config_help)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, help=config_help)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config = commands.add_parser("config", help="check or show the configuration")
    config_cmds = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    for name, func, text in [
        ("check", cmd_config_check, "validate a config file; exit 2 on error"),
        ("show", cmd_config_show, "print the effective config, secrets masked"),
    ]:
        sub = config_cmds.add_parser(name, help=text)
        sub.add_argument("file", nargs="?", help="config file (default: ./mlxserve.toml)")
        sub.set_defaults(func=func, mlx=False)  # validating a config never imports MLX

    plugins = commands.add_parser("plugins", help="list plugins and their model families")
    plugins_cmds = plugins.add_subparsers(dest="plugins_command", required=True, metavar="ACTION")
    plugins_cmds.add_parser(
        "list", parents=[common], help="families, model types, packages"
    ).set_defaults(func=cmd_plugins_list)

    add_models_commands(commands, common)

    serve = commands.add_parser(
        "serve", parents=[common], help="start the OpenAI-compatible server"
    )
    serve.add_argument("--host", help="interface to bind (default: [server] host)")
    serve.add_argument("--port", type=int, help="port (default: [server] port)")
    serve.add_argument(
        "--model", dest="default_model", help="default model: a registry name or alias"
    )
    serve.set_defaults(func=cmd_serve)

    launch = commands.add_parser(
        "launch",
        parents=[common],
        help="start every [distributed] host's rank with mlx.launch (or mpirun)",
    )
    launch.add_argument("--dry-run", action="store_true", help="print what would run")
    launch.set_defaults(func=cmd_launch, mlx=False)  # its ranks run `serve`

    generate = commands.add_parser("generate", parents=[common], help="answer one prompt and exit")
    generate.add_argument("prompt")
    generate.add_argument("--model", help="a registry name or alias (default: the default)")
    generate.add_argument("--max-tokens", type=int, default=32)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    generate.set_defaults(func=cmd_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        overrides = {
            "server.host": getattr(args, "host", None),
            "server.port": getattr(args, "port", None),
            "registry.default_model": getattr(args, "default_model", None),
        }
        config = load_config(getattr(args, "file", None) or args.config, overrides=overrides)
        setup_logging(config.logging.level, config.logging.file)
        if getattr(args, "mlx", True):
            from mlxserve.core.cpu.startup import prepare_mlx

            prepare_mlx()  # before anything imports MLX: the fast BLAS, the open-files limit
        return args.func(args, config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except MlxserveError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
