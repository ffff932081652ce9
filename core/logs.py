"""Log set-up: one format for every process, with the rank when there are several."""

from __future__ import annotations

import logging
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
