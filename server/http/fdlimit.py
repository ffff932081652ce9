"""The open-files limit: mlx_lm must not lower it, and ``mlxserve serve`` raises it.

Standard library only: ``mlxserve.server`` imports this before anything imports mlx_lm.
"""

from __future__ import annotations

import resource
import sys

NOFILE = resource.RLIMIT_NOFILE
INFINITY = resource.RLIM_INFINITY
# Soft limits tried when the hard limit is "unlimited" (macOS refuses a soft limit above
# kern.maxfilesperproc, often 10240 or 24576, with EINVAL).
UNLIMITED_TRIES = (1 << 20, 65536, 24576, 10240)
# The limits the process started with (before mlx_lm could change them), for the log.
STARTING_LIMITS = resource.getrlimit(NOFILE)


def import_mlx_lm_keeping_fd_limit() -> None:
    """Import ``mlx_lm.utils`` without letting it change the open-files limit for the worse.

    When first imported it calls ``setrlimit(RLIMIT_NOFILE, (2048, 4096))``: that lowers a
    higher hard limit for the life of the process (only root may raise it again), lowers a
    higher soft limit, and fails the import (ValueError) where the hard limit is below 4096.
    During that import setrlimit may only raise the soft limit, within the hard limit.
    """
    if "mlx_lm.utils" in sys.modules:
        return
    import mlxserve.core  # noqa: F401  (first: it puts the fastest BLAS under MLX)

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


def raise_fd_limit() -> tuple[int, int, int]:
    """Raise the soft open-files limit as far as the hard limit allows.

    Returns:
        ``(soft limit the process started with, soft limit now, hard limit)``;
        RLIM_INFINITY is returned as -1.
    """
    current, hard = resource.getrlimit(NOFILE)
    start = STARTING_LIMITS[0]
    lower = start != INFINITY and (current == INFINITY or start < current)
    before = start if lower else current
    now = current
    if current != INFINITY:
        tries = UNLIMITED_TRIES if hard == INFINITY else (hard,)
        for wanted in tries:
            if wanted <= current:
                break
            try:
                resource.setrlimit(NOFILE, (wanted, hard))
            except (ValueError, OSError):
                continue
            now = wanted
            break

    def shown(value: int) -> int:
        return -1 if value == INFINITY else value

    return shown(before), shown(now), shown(hard)
