"""``mlxserve launch``: start one rank per ``[distributed] hosts`` entry with ``mlx.launch``."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from mlxserve.core.config.schema import Config
from mlxserve.core.distributed.hostfile import launch_hostfile

# mlx.launch waits in select() for its ranks' stdin to be writable, which it always is, so it
# spins on a core for as long as the ranks run. mlxserve sends no input: drop the wait.
LAUNCHER = """
from select import select as wait
from mlx._distributed_utils import launch
launch.select = lambda r, w, x, timeout=None: (*wait(r, [], x, timeout)[:1], [], [])
launch.main()
"""
# mlx.launch exits 0 whatever its ranks do; it only says so on stderr.
RANK_FAILED = re.compile(r"Node with rank (\d+) (?:exited with code -?\d+|was killed)")


def launch_command(config: Config, config_file: str | None, hostfile_path: str) -> list[str]:
    """The mlx.launch command that starts every rank, each running ``mlxserve serve``."""
    dist = config.distributed
    python = dist.python or sys.executable
    launcher = [sys.executable, "-c", LAUNCHER]
    command = [
        *launcher,
        "--hostfile",
        hostfile_path,
        "--backend",
        dist.backend,
        "--starting-port",
        str(dist.starting_port),
    ]
    if dist.workdir:
        command += ["--cwd", dist.workdir]
    serve = [python, "-m", "mlxserve.server.cli.main"]
    if config_file:
        serve += ["--config", str(Path(config_file).resolve()) if not dist.workdir else config_file]
    return [*command, "--", *serve, "serve"]


def run_launch(config: Config, config_file: str | None, dry_run: bool) -> int:
    """Write the hostfile and start every rank; Ctrl-C or SIGTERM stops them all."""
    hosts = launch_hostfile(config.distributed)
    with tempfile.NamedTemporaryFile(
        "w", suffix=".json", prefix="mlxserve-hosts-", delete=False
    ) as f:
        json.dump(hosts, f, indent=2)
    command = launch_command(config, config_file, f.name)
    print(f"hostfile {f.name}:\n{json.dumps(hosts, indent=2)}")
    print("command:", shlex.join(command), flush=True)
    if dry_run:
        return 0
    process = subprocess.Popen(
        command,
        stdin=subprocess.PIPE,  # kept open and empty, so that mlx.launch waits on it quietly
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
        start_new_session=True,
    )

    def stop(signum: int, _: Any) -> None:
        # mlx.launch does not pass signals on; its local ranks share its process group and
        # remote ones end with their ssh session.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    failed = False
    assert process.stderr is not None
    for line in process.stderr:
        sys.stderr.write(line)
        failed = failed or RANK_FAILED.search(line) is not None
    returncode = process.wait()
    return 1 if failed else returncode
