"""Rank 0's side of the conversation with the other ranks (nothing to say on one rank).

Everything the other ranks must do in lockstep goes through here: loading and unloading a
model, each step's plan, resets, idling and stopping. A watchdog notices a rank that stops
answering within the step timeout; a rank whose connection drops is noticed at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from .distributed import Cluster
from .errors import MlxserveError
from .plan import StepPlan

log = logging.getLogger(__name__)


def lost_a_rank(exc: BaseException) -> bool:
    """Whether ``exc`` is MLX's ring backend saying a peer is gone."""
    return isinstance(exc, RuntimeError) and "[ring]" in str(exc)


class Coordinator:
    def __init__(
        self, cluster: Cluster, step_timeout_s: float, on_lost: Callable[[str], None]
    ) -> None:
        self.cluster = cluster
        self.step_timeout_s = step_timeout_s
        self.on_lost = on_lost
        self.lost = False
        self._busy_since: float | None = None

    @property
    def distributed(self) -> bool:
        return self.cluster.distributed

    def start(self) -> None:
        if self.distributed:
            threading.Thread(target=self._watch, name="mlxserve-watchdog", daemon=True).start()

    def together(self, work: Callable[[], Any]) -> Any:
        """Run work that the other ranks take part in, under the watchdog."""
        if not self.distributed:
            return work()
        self._busy_since = time.monotonic()
        try:
            return work()
        except Exception as exc:
            if lost_a_rank(exc):
                self._lose(f"lost contact with {self._others()}: {exc}")
            raise
        finally:
            self._busy_since = None

    def tell(self, op: str, **fields: Any) -> None:
        """Have every other rank do ``op`` (load, unload, step, reset, idle, stop)."""
        if self.distributed:
            self.together(lambda: self.cluster.broadcast({"op": op, **fields}))

    def load(self, name: str, load_model: Callable[[str], Any]) -> Any:
        """Load on every rank at once; fail (everywhere) if any rank fails."""
        return self.together(lambda: self._load_everywhere(name, load_model))

    def announcer(self, name: str) -> Callable[[StepPlan], None] | None:
        """What sends each step plan of model ``name`` to the other ranks, if there are any."""
        if not self.distributed:
            return None
        return lambda plan: self.cluster.broadcast(
            {"op": "step", "model": name, "plan": plan.to_json()}
        )

    def _load_everywhere(self, name: str, load_model: Callable[[str], Any]) -> Any:
        self.cluster.broadcast({"op": "load", "model": name})
        model, error = None, None
        try:
            model = load_model(name)
        except Exception as exc:
            error = exc
        statuses = self.cluster.gather(0 if error else 1)
        failed = [rank for rank, ok in enumerate(statuses) if not ok]
        if failed:
            if len(failed) < len(statuses):
                self.cluster.broadcast({"op": "unload", "model": name})
            if error is not None:
                raise error
            raise MlxserveError(
                f"rank {', '.join(map(str, failed))} could not load model {name!r} "
                f"(see that rank's log)"
            )
        placement = getattr(model, "placement", None)
        if placement is not None and self.distributed:
            log.info("model %s: %s", name, placement.describe())
        return model

    def _watch(self) -> None:
        timeout = self.step_timeout_s
        while not self.lost:
            time.sleep(min(0.5, timeout / 4))
            started = self._busy_since
            if started is not None and time.monotonic() - started > timeout:
                self._lose(
                    f"{self._others()} did not answer within "
                    f"[distributed] step_timeout_s ({timeout:g} s)"
                )

    def _lose(self, reason: str) -> None:
        if not self.lost:
            self.lost = True
            self.on_lost(reason)

    def _others(self) -> str:
        others = list(range(1, self.cluster.size))
        return f"rank {others[0]}" if len(others) == 1 else f"ranks {others[0]}-{others[-1]}"
