"""The open-files limit: ``mlxserve serve`` raises it (and mlx_lm must not lower it: see
core/cpu/startup.py, which imports mlx_lm and keeps the limits the process started with)."""

from __future__ import annotations

import resource

from mlxserve.core.cpu.startup import INFINITY, NOFILE, STARTING_LIMITS

# Soft limits tried when the hard limit is "unlimited" (macOS refuses a soft limit above
# kern.maxfilesperproc, often 10240 or 24576, with EINVAL).
UNLIMITED_TRIES = (1 << 20, 65536, 24576, 10240)


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
