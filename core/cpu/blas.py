"""Put the fastest BLAS this machine has under MLX, before MLX is first imported (Linux only).

MLX's Linux CPU wheel links a slow reference BLAS by name; a library loaded with RTLD_GLOBAL
before ``mlx.core`` supplies the same symbols first and wins. Its matrix-vector rate bounds
single-stream decoding. The entry points run it first (``prepare_mlx`` in startup.py; a warning
is logged if MLX was imported before it); environment variables are its only switches:

- ``MLXSERVE_BLAS``: ``auto`` (default: mkl, else openblas, else MLX's own), ``off`` (MLX's
  own), ``mkl``, ``openblas``, or the path of a shared library exporting the standard BLAS.
- ``MLXSERVE_BLAS_THREADS``: BLAS threads per process. Without it, an operator's
  ``MKL_NUM_THREADS``/``OMP_NUM_THREADS``/``OPENBLAS_NUM_THREADS`` is kept, else the cores this
  process may use, shared among the ranks on this host.
- ``MLXSERVE_CPU_SPLIT``: ``auto`` (default), ``off`` or a number. When the thread count is
  mlxserve's own choice, ``auto`` gives BLAS one thread and runs each linear layer on that many
  CPU streams instead (see parallel_linear.py: faster for the small matmuls of decoding);
  ``off`` gives the threads to BLAS; a number forces that many streams.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mlxserve.core.distributed.hostfile import ranks_sharing_host, read_hostfile

log = logging.getLogger(__name__)

THREAD_VARIABLES = ("MKL_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")
# Marks thread variables this loader set, so that child processes (mlx.launch's local ranks
# inherit this environment) work out their own share instead of taking ours as the operator's.
AUTO_THREADS_MARK = "MLXSERVE_BLAS_AUTO_THREADS"
OPENBLAS_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
    "/usr/local/lib/libopenblas.so.0",
)


@dataclass(frozen=True)
class BlasInfo:
    """Which BLAS MLX computes with in this process, and why."""

    name: str  # "mkl", "openblas", "bundled", "custom" or "platform" (macOS)
    path: str | None
    threads: int | None  # None: not known
    reason: str

    def describe(self) -> str:
        threads = "?" if self.threads is None else str(self.threads)
        where = f" ({self.path})" if self.path else ""
        return f"BLAS {self.name}{where}, {threads} thread(s): {self.reason}"


_loaded: BlasInfo | None = None
_cpu_split = 1


def load_fast_blas() -> BlasInfo:
    """Load the best BLAS once; later calls return what the first one did. Never raises."""
    global _loaded
    if _loaded is None:
        try:
            _loaded = _choose_and_load()
        except Exception as exc:  # a faster BLAS is never worth failing to start
            _loaded = BlasInfo("bundled", None, 1, f"loader failed ({exc!r}); MLX's own BLAS")
    return _loaded


def _choose_and_load() -> BlasInfo:
    if sys.platform != "linux":
        return BlasInfo("platform", None, None, "not Linux: MLX uses Accelerate/Metal")
    choice = os.environ.get("MLXSERVE_BLAS", "auto").strip() or "auto"
    mode = choice.lower()
    if "mlx.core" in sys.modules:
        name, path = _mapped_blas()
        if name == "bundled" and mode != "off":
            log.warning(
                "mlx.core was imported before the BLAS loader ran: MLX computes with its own, "
                "slower BLAS (call mlxserve.core.cpu.startup.prepare_mlx() before importing mlx)"
            )
        return BlasInfo(name, path, None, "mlx.core was already imported")
    preloaded, preloaded_path = _mapped_blas()
    if preloaded != "bundled":
        return BlasInfo(preloaded, preloaded_path, _threads_of(preloaded), "already loaded")
    if mode == "off":
        return BlasInfo("bundled", None, 1, "MLXSERVE_BLAS=off")
    threads_reason = _set_thread_variables()
    attempts: list[tuple[str, Callable[[], str]]] = [
        ("mkl", _load_mkl),
        ("openblas", _load_openblas),
    ]
    if mode != "auto":
        attempts = [a for a in attempts if a[0] == mode] or [
            ("custom", lambda: _load_library(choice))
        ]
    failures = []
    for name, load in attempts:
        try:
            path = load()
        except (OSError, LookupError) as exc:
            failures.append(f"{name}: {exc}")
            continue
        return BlasInfo(name, path, _threads_of(name), f"MLXSERVE_BLAS={choice}; {threads_reason}")
    return BlasInfo("bundled", None, 1, f"none other loaded ({'; '.join(failures)})")


def _load_mkl() -> str:
    """PyPI's ``mkl`` wheel: libmkl_rt, after the OpenMP runtime (libiomp5) it threads with."""
    openmp = _wheel_library("intel-openmp", "libiomp5.so")
    runtime = _wheel_library("mkl", "libmkl_rt.so")
    if runtime is None:
        raise LookupError("libmkl_rt.so not found (pip install mkl)")
    if openmp is None:
        raise LookupError("libiomp5.so not found (pip install intel-openmp)")
    _load_library(openmp)
    return _load_library(runtime)


def _load_openblas() -> str:
    candidates = [path for path in OPENBLAS_PATHS if Path(path).exists()]
    candidates += filter(None, [ctypes.util.find_library("openblas")])
    if not candidates:
        raise LookupError("libopenblas.so.0 not found (apt-get install libopenblas0-pthread)")
    return _load_library(candidates[0])


def _load_library(path: str) -> str:
    ctypes.CDLL(path, mode=os.RTLD_GLOBAL)
    return path


def _wheel_library(distribution: str, stem: str) -> str | None:
    """The installed ``stem`` (or ``stem.N``) shipped by ``distribution``, or under sys.prefix."""
    candidates: list[Path] = []
    try:
        files = importlib.metadata.files(distribution) or []
        candidates = [Path(str(file.locate())) for file in files if file.name.startswith(stem)]
    except importlib.metadata.PackageNotFoundError:
        pass
    candidates += sorted((Path(sys.prefix) / "lib").glob(stem + "*"))
    existing = [path.resolve() for path in candidates if path.exists()]
    return str(existing[0]) if existing else None


def _mapped_blas() -> tuple[str, str | None]:
    """Which BLAS this process has mapped already (e.g. LD_PRELOAD), "bundled" if none."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            paths = {line.split()[-1] for line in maps if "/" in line}
    except OSError:
        return "bundled", None
    for path in sorted(paths):
        library = Path(path).name
        if library.startswith("libmkl_rt"):
            return "mkl", path
        if library.startswith("libopenblas"):
            return "openblas", path
    return "bundled", None


def _threads_of(name: str) -> int | None:
    """What the loaded library says it will use (it reads the environment set before)."""
    queries = {"mkl": "MKL_Get_Max_Threads", "openblas": "openblas_get_num_threads"}
    if name == "bundled":
        return 1
    symbols = [queries[name]] if name in queries else list(queries.values())
    process = ctypes.CDLL(None)
    for symbol in symbols:
        query = getattr(process, symbol, None)
        if query is not None:
            query.restype = ctypes.c_int
            return int(query())
    return None


def cpu_split() -> int:
    """How many CPU streams each linear layer runs on (1: BLAS threads do the work)."""
    return _cpu_split


def _set_thread_variables() -> str:
    """Set the BLAS thread variables (those the operator left unset), and the CPU split; say
    where the counts came from."""
    global _cpu_split
    ours = os.environ.get(AUTO_THREADS_MARK)
    operators = {
        var: os.environ[var]
        for var in THREAD_VARIABLES
        if os.environ.get(var) and os.environ[var] != ours
    }
    override = os.environ.get("MLXSERVE_BLAS_THREADS", "").strip()
    if override.isdigit() and int(override) > 0:
        threads, reason, operators = int(override), "MLXSERVE_BLAS_THREADS", {}
    elif operators and next(iter(operators.values())).isdigit():
        var, value = next(iter(operators.items()))
        threads, reason = int(value), f"threads from {var}"
    else:
        threads, reason = blas_threads()
    split = _split_of(threads, own_choice=reason != "MLXSERVE_BLAS_THREADS" and not operators)
    if split > 1:
        _cpu_split, threads = split, 1
        reason += f"; linear layers split over {split} CPU streams (MLXSERVE_CPU_SPLIT)"
    for var in THREAD_VARIABLES:
        if var not in operators:
            os.environ[var] = str(threads)
    os.environ[AUTO_THREADS_MARK] = str(threads)
    return reason


def _split_of(threads: int, own_choice: bool) -> int:
    setting = os.environ.get("MLXSERVE_CPU_SPLIT", "auto").strip().lower() or "auto"
    if setting.isdigit():
        return max(1, int(setting))
    return threads if setting == "auto" and own_choice else 1


def blas_threads() -> tuple[int, str]:
    """The cores this process may use, shared among the ranks on this host; and why."""
    affinity = len(os.sched_getaffinity(0))
    cores = min(affinity, _cpu_quota() or affinity)
    ranks = ranks_on_this_host()
    if ranks > 1 and affinity >= _cores_of_this_machine():
        return max(1, cores // ranks), f"{cores} cores shared by {ranks} ranks on this host"
    pinned = " (pinned)" if ranks > 1 else ""
    return cores, f"{cores} cores{pinned}"


def _cpu_quota() -> int | None:
    """The CPUs a container's quota (cgroup v2 ``cpu.max``) allows, if it sets one."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return max(1, -(-int(quota) // int(period)))
    except (OSError, ValueError):
        return None  # no file, or "max": no quota


def _cores_of_this_machine() -> int:
    """The CPUs this container may use (its cpuset), or the machine's; a rank whose affinity
    is narrower was pinned by its operator and keeps its cores."""
    try:
        cpus = Path("/sys/fs/cgroup/cpuset.cpus.effective").read_text().strip()
        count = 0
        for part in cpus.split(","):
            start, _, end = part.partition("-")
            count += int(end or start) - int(start) + 1
        return count
    except (OSError, ValueError):
        return os.cpu_count() or 1


def ranks_on_this_host() -> int:
    """How many of the launched ranks run on this host: as mpirun says
    (``OMPI_COMM_WORLD_LOCAL_SIZE``), else those listening on this rank's IP in mlx.launch's
    hostfile (1 when not launched, or without a hostfile: JACCL, one rank per Mac)."""
    local = os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", "")
    if local.isdigit() and int(local) > 0:
        return int(local)
    try:
        rank = int(os.environ["MLX_RANK"])
    except (KeyError, ValueError):
        return 1
    return ranks_sharing_host(read_hostfile(), rank)
