"""``mlxserve launch``: start one rank per host of ``[distributed]`` with mlx.launch (ring,
JACCL) or Open MPI's mpirun (MPI), each running ``mlxserve serve``."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from mlxserve.core.config.schema import Config
from mlxserve.core.distributed.hostfile import (
    RANK_ZERO_ENV,
    heartbeat_target,
    launch_hostfile,
    mpi_hostfile,
)
from mlxserve.core.errors import MlxserveError

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
# Where MLX looks for Open MPI's library (mx.distributed's MPI backend dlopens it).
MPI_LIBRARY_ENV = "MLX_MPI_LIBNAME"
INSTALL_OPEN_MPI = "install Open MPI (apt-get install openmpi-bin, or brew install open-mpi)"


def rank_environment(config: Config, hosts: dict[str, Any]) -> dict[str, str]:
    """What every rank is given besides what its launcher sets: rank 0's heartbeat address
    and, for MPI, where Open MPI's library is (and the hostfile's own ``envs``, which
    mlx.launch passes on itself)."""
    env: dict[str, str] = {}
    target = heartbeat_target(hosts, config.distributed.starting_port)
    if target is not None:
        env[RANK_ZERO_ENV] = target
    if config.distributed.backend == "mpi":
        for entry in hosts.get("envs") or ():
            key, _, value = str(entry).partition("=")
            env[key] = value
        library = os.environ.get(MPI_LIBRARY_ENV) or open_mpi_library()
        if library:
            env[MPI_LIBRARY_ENV] = library
    return env


def open_mpi_library() -> str | None:
    """The path of the libmpi Open MPI's own tools link (so that MLX loads that one, also where
    only a versioned ``libmpi.so.40`` is installed); None if it cannot be told."""
    ompi_info = shutil.which("ompi_info")
    if ompi_info is None:
        return None
    darwin = platform.system() == "Darwin"
    lister = ["otool", "-L", ompi_info] if darwin else ["ldd", ompi_info]
    try:
        listing = subprocess.run(lister, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in listing.splitlines():
        if "libmpi." not in line:
            continue
        if darwin:  # "@rpath/libmpi.40.dylib (...)": in the lib folder beside mpirun's bin
            name = Path(line.split()[0]).name
            return str(Path(ompi_info).resolve().parent.parent / "lib" / name)
        path = line.partition("=>")[2].split()  # "libmpi.so.40 => /usr/lib/.../libmpi.so.40"
        return path[0] if path else None
    return None


def launch_command(
    config: Config, config_file: str | None, hostfile_path: str, env: dict[str, str]
) -> list[str]:
    """The command that starts every rank, each running ``mlxserve serve``: mlx.launch with the
    launch hostfile (ring, JACCL), or mpirun with its own hostfile (MPI)."""
    dist = config.distributed
    python = dist.python or sys.executable
    serve = [python, "-m", "mlxserve.server.cli.main"]
    if config_file:
        serve += ["--config", str(Path(config_file).resolve()) if not dist.workdir else config_file]
    serve.append("serve")
    if dist.backend == "mpi":
        # mpirun itself, not mlx.launch: mlx.launch gives mpirun `--output :raw`, which Open MPI
        # 4's mpirun (Debian 12, Ubuntu 24.04) refuses, and it exits 0 whatever mpirun does.
        # --bind-to none: mpirun would pin each rank to a single core, and a rank computes with
        # every core it is given.
        command = [shutil.which("mpirun") or "mpirun", "--hostfile", hostfile_path]
        command += ["--bind-to", "none"]
        for key, value in env.items():
            command += ["-x", f"{key}={value}"]
        if dist.workdir:
            command += ["--wdir", dist.workdir]
        return [*command, "--", *serve]
    command = [sys.executable, "-c", LAUNCHER, "--hostfile", hostfile_path]
    command += ["--backend", dist.backend, "--starting-port", str(dist.starting_port)]
    for key, value in env.items():
        command += ["--env", f"{key}={value}"]
    if dist.workdir:
        command += ["--cwd", dist.workdir]
    return [*command, "--", *serve]


def check_backend(config: Config, env: dict[str, str]) -> None:
    """Refuse, before starting anything, a backend this machine cannot run.

    Raises:
        MlxserveError: the backend is not available (MLX's own check), or mpirun is missing.
    """
    backend = config.distributed.backend
    if backend == "mpi":
        if shutil.which("mpirun") is None:
            raise MlxserveError(
                f'[distributed] backend = "mpi": mpirun is not on the PATH; {INSTALL_OPEN_MPI}'
            )
        if MPI_LIBRARY_ENV in env:  # MLX reads it once, when it first looks for MPI
            os.environ.setdefault(MPI_LIBRARY_ENV, env[MPI_LIBRARY_ENV])
    from mlxserve.core.distributed.cluster import refuse_unavailable

    refuse_unavailable(backend)


def _write(text: str, suffix: str) -> str:
    with tempfile.NamedTemporaryFile(
        "w", suffix=suffix, prefix="mlxserve-hosts-", delete=False
    ) as file:
        file.write(text)
    return file.name


def run_launch(config: Config, config_file: str | None, dry_run: bool) -> int:
    """Write the hostfile and start every rank; Ctrl-C or SIGTERM stops them all."""
    dist = config.distributed
    hosts = launch_hostfile(dist)
    env = rank_environment(config, hosts)
    if not dry_run:
        check_backend(config, env)
    if dist.backend == "mpi":
        text = mpi_hostfile(hosts)
        path = _write(text, ".txt")
    elif dist.hostfile is not None:
        text, path = json.dumps(hosts, indent=2), str(dist.hostfile)
    else:
        text = json.dumps(hosts, indent=2)
        path = _write(text, ".json")
    command = launch_command(config, config_file, path, env)
    print(f"hostfile {path}:\n{text.rstrip()}")
    print("command:", shlex.join(command), flush=True)
    if dry_run:
        return 0
    mpi = dist.backend == "mpi"
    process = subprocess.Popen(
        command,
        # mlx.launch: kept open and empty, so that it waits on it quietly; mpirun would hand
        # it to rank 0.
        stdin=subprocess.DEVNULL if mpi else subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
        start_new_session=True,
    )

    def stop(signum: int, _: Any) -> None:
        # mlx.launch does not pass signals on; its local ranks share its process group and
        # remote ones end with their ssh session. mpirun ends its ranks itself.
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
