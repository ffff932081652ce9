"""Rank 0's side of the conversation with the other ranks (nothing to say on one rank).

Everything the other ranks must do in lockstep goes through here: loading and unloading a
model, each step's plan, resets, idling and stopping. A rank whose connection drops is noticed
at once. While work is in flight, a watchdog declares a rank lost once it has not been heard
from (heartbeat.py) for the step timeout: a slow rank still beats, a stopped one does not.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from .distributed import Cluster
from .errors import MlxserveError
from .heartbeat import HeartbeatListener, beat_interval
from .plan import StepPlan

log = logging.getLogger(__name__)

# Hearing a rank is not seeing it progress: a step that never ends while every rank still
# beats (a deadlock) must end the group too, if much later.
STEP_CAP_FACTOR = 20


def lost_a_rank(exc: BaseException) -> bool:
    """Whether ``exc`` is MLX's ring backend saying a peer is gone."""
    return isinstance(exc, RuntimeError) and "[ring]" in str(exc)


class Coordinator:
    def __init__(
        self,
        cluster: Cluster,
        step_timeout_s: float,
        on_lost: Callable[[str], None],
        max_step_s: float | None = None,
    ) -> None:
        self.cluster = cluster
        self.step_timeout_s = step_timeout_s
        self.max_step_s = max_step_s or STEP_CAP_FACTOR * step_timeout_s
        self.on_lost = on_lost
        self.lost = False
        self._in_flight: tuple[float, float | None] | None = None  # (since, max seconds)
        self._ear: HeartbeatListener | None = None

    @property
    def distributed(self) -> bool:
        return self.cluster.distributed

    def start(self) -> None:
        if self.distributed:
            self._ear = self._listen()
            threading.Thread(target=self._watch, name="mlxserve-watchdog", daemon=True).start()

    def together(self, work: Callable[[], Any]) -> Any:
        """Run work that the other ranks take part in, under the watchdog."""
        return self._together(work, self.max_step_s)

    def _together(self, work: Callable[[], Any], max_s: float | None) -> Any:
        if not self.distributed:
            return work()
        self._in_flight = (time.monotonic(), max_s)
        try:
            return work()
        except Exception as exc:
            if lost_a_rank(exc):
                self._lose(f"lost contact with {self._others()}: {exc}")
            raise
        finally:
            self._in_flight = None

    def tell(self, op: str, **fields: Any) -> None:
        """Have every other rank do ``op`` (load, unload, step, reset, idle, stop)."""
        if self.distributed:
            self.together(lambda: self.cluster.broadcast({"op": op, **fields}))

    def load(self, name: str, load_model: Callable[[str], Any]) -> Any:
        """Load on every rank at once; fail (everywhere) if any rank fails.

        Not capped: downloading weights takes as long as it takes, while the ranks beat.
        """
        return self._together(lambda: self._load_everywhere(name, load_model), None)

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

    def _listen(self) -> HeartbeatListener | None:
        address = self.cluster.rank_zero_address
        if address is None:
            log.warning("no ring hostfile: a step longer than the step timeout ends the group")
            return None
        try:
            return HeartbeatListener(address, self.cluster.launch_token)
        except OSError as exc:
            log.warning(
                "cannot hear heartbeats on UDP %s:%d (%s): a step longer than the step "
                "timeout ends the group",
                *address,
                exc,
            )
            return None

    def _watch(self) -> None:
        interval = beat_interval(self.step_timeout_s)
        while not self.lost:
            if self._ear is None:
                time.sleep(interval)
            else:
                self._ear.listen(interval)
            in_flight = self._in_flight
            if in_flight is not None:
                reason = self._overdue(*in_flight, time.monotonic())
                if reason:
                    self._lose(reason)
        if self._ear is not None:
            self._ear.close()

    def _overdue(self, since: float, max_s: float | None, now: float) -> str | None:
        """Why the work in flight since ``since`` cannot end well, if it cannot."""
        timeout = self.step_timeout_s
        heard = self._ear.last_heard if self._ear else {}
        silent = [
            rank
            for rank in range(1, self.cluster.size)
            if now - max(heard.get(rank, since), since) > timeout
        ]
        if silent:
            who = "rank" if len(silent) == 1 else "ranks"
            never = self._ear is not None and not any(rank in heard for rank in silent)
            return (
                f"{who} {', '.join(map(str, silent))} did not answer within "
                f"[distributed] step_timeout_s ({timeout:g} s)"
                + (" (and no heartbeat of it ever reached rank 0 over UDP)" if never else "")
            )
        if max_s is not None and now - since > max_s:
            return (
                f"a step did not end within {max_s:g} s ({STEP_CAP_FACTOR} x [distributed] "
                f"step_timeout_s) although {self._others()} still answered: the ranks are stuck"
            )
        return None

    def _lose(self, reason: str) -> None:
        if not self.lost:
            self.lost = True
            self.on_lost(reason)

    def _others(self) -> str:
        others = list(range(1, self.cluster.size))
        return f"rank {others[0]}" if len(others) == 1 else f"ranks {others[0]}-{others[-1]}"
