"""Log set-up: one format for every process, with the rank when there are several."""

from __future__ import annotations

import logging
import time
from pathlib import Path


def setup_logging(level: str = "info", file: Path | None = None, rank: int | None = None) -> None:
    """Send mlxserve's logs to stderr (and ``file``), each line marked with the rank if any."""
    where = f" [rank {rank}]" if rank is not None else ""
    formatter = logging.Formatter(f"%(asctime)s %(levelname)s{where} %(name)s: %(message)s")
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if file is not None:
        Path(file).expanduser().parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(file).expanduser(), encoding="utf-8"))
    root = logging.getLogger("mlxserve")
    root.handlers.clear()
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False


class RateLimitedLog:
    """Log lines at most ``per_second`` a second on average (bursts of that many); the lines
    left out are counted and said with the next line that is logged."""

    def __init__(self, logger: logging.Logger, per_second: float = 5.0) -> None:
        self.logger, self.per_second = logger, per_second
        self.allowance, self.last, self.skipped = per_second, time.monotonic(), 0

    def info(self, message: str, *args: object) -> bool:
        """Log ``message % args`` at INFO unless over the rate; whether it was logged."""
        now = time.monotonic()
        self.allowance = min(self.per_second, self.allowance + (now - self.last) * self.per_second)
        self.last = now
        if self.allowance < 1:
            self.skipped += 1
            return False
        self.allowance -= 1
        if self.skipped:
            message += f" ({self.skipped} more like it not logged)"
            self.skipped = 0
        self.logger.info(message, *args)
        return True
