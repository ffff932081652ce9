"""What a process that computes with MLX does first, before anything imports MLX.

Importing mlxserve does no work: no BLAS is loaded and neither MLX nor mlx_lm is imported (so
validating a configuration never touches them). The entry points call ``prepare_mlx()`` before
they import anything that imports MLX: ``mlxserve serve`` (and so every rank ``mlxserve
launch`` starts), ``generate``, the ``models`` and ``plugins`` commands, the benchmarks and the
test suite. Standard library only until it runs.
"""

from __future__ import annotations

import resource
import sys

from mlxserve.core.cpu.blas import BlasInfo, load_fast_blas

NOFILE = resource.RLIMIT_NOFILE
INFINITY = resource.RLIM_INFINITY
# The open-files limits the process started with (before mlx_lm could change them), for the
# server's log (server/http/fdlimit.py).
STARTING_LIMITS = resource.getrlimit(NOFILE)


def prepare_mlx() -> BlasInfo:
    """Put the fastest BLAS under MLX (blas.py), then import mlx_lm keeping the open-files
    limit; which BLAS MLX computes with. Later calls do nothing more."""
    info = load_fast_blas()
    import_mlx_lm_keeping_fd_limit()
    return info


def import_mlx_lm_keeping_fd_limit() -> None:
    """Import ``mlx_lm.utils`` without letting it change the open-files limit for the worse.

    When first imported it calls ``setrlimit(RLIMIT_NOFILE, (2048, 4096))``: that lowers a
    higher hard limit for the life of the process (only root may raise it again), lowers a
    higher soft limit, and fails the import (ValueError) where the hard limit is below 4096.
    During that import setrlimit may only raise the soft limit, within the hard limit.
    """
    if "mlx_lm.utils" in sys.modules:
        return
    real = resource.setrlimit

    def only_raise(which: int, limits: tuple[int, int]) -> None:
        if which != NOFILE:
            real(which, limits)
            return
        soft, hard = resource.getrlimit(NOFILE)
        wanted = limits[0] if hard == INFINITY else min(limits[0], hard)
        if soft != INFINITY and wanted > soft:
            real(NOFILE, (wanted, hard))

    resource.setrlimit = only_raise
    try:
        import mlx_lm.utils  # noqa: F401
    finally:
        resource.setrlimit = real
