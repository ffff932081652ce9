"""The ranks' conversation: rank 0 says what to do, every other rank does it, in order.

Rank 0 serves HTTP and schedules. Its messages (idle, stop, load, unload, reset, step) go
point to point down the chain rank 0 → rank N-1 → … → rank 1, each rank passing them on
before acting. On a pipeline the hidden states flow the same way (rank N-1 runs the first
layers, rank 0 the last), so a step's plan reaches every rank ahead of the hidden states
it goes with, and several steps can be on their way at once (see worker.py). A step costs
one framed message of a few hundred bytes (wire.py), not a collective.

A rank whose connection drops is noticed at once. While work is in flight, a watchdog on
rank 0 declares a rank lost once it has not been heard from (heartbeat.py) for the step
timeout: a slow rank still beats, a stopped one does not.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from enum import IntEnum
from typing import Any

import mlx.core as mx
import numpy as np

from mlxserve.core.distributed.cluster import Cluster
from mlxserve.core.distributed.heartbeat import HeartbeatListener, HeartbeatSender, beat_interval
from mlxserve.core.distributed.wire import Reader, Writer
from mlxserve.core.engine.plan import StepPlan
from mlxserve.core.engine.runner import ModelRunner
from mlxserve.core.engine.settings import EngineSettings
from mlxserve.core.engine.worker import ServedModel, make_runner
from mlxserve.core.errors import MlxserveError

log = logging.getLogger(__name__)

# Hearing a rank is not seeing it progress: a step that never ends while every rank still
# beats (a deadlock) must end the group too, if much later.
STEP_CAP_FACTOR = 20
# Every message is received as one frame of this size (its first 8 bytes give its length);
# a longer one (a long prompt's chunk) follows with its remainder.
FRAME_BYTES = 1024
# Tests only: make each step of a follower this many seconds slower (slow, not dead).
SLOW_STEP_ENV = "MLXSERVE_TEST_SLOW_STEP_S"


class Op(IntEnum):
    IDLE = 1
    STOP = 2
    LOAD = 3
    UNLOAD = 4
    RESET = 5
    STEP = 6


# How MLX's backends begin the errors of their collectives. MLX raises an error of a
# communication as a RuntimeError with the backend's own text: the ring's "[ring] connection
# to a peer was lost" (a closed socket); JACCL's "[jaccl] Send failed ..."/"[jaccl] Recv
# failed ..." (a queue pair gone to its error state). JACCL does not read the status of the
# completions it polls, so a peer that vanishes mid-collective may leave it waiting instead:
# the heartbeats tell that apart. MPI raises nothing: Open MPI's default error handler ends
# the process, and mpirun then ends every rank (its exit status is not 0).
BACKEND_TAGS = ("[ring]", "[jaccl]", "[mesh]")  # the last: mlxserve's all-reduce


def lost_a_rank(exc: BaseException) -> bool:
    """Whether ``exc`` is MLX's distributed backend, or mlxserve's all-reduce mesh, saying a
    peer is gone."""
    return isinstance(exc, RuntimeError) and any(tag in str(exc) for tag in BACKEND_TAGS)


class Link:
    """This rank's place in the message chain: whom it hears from, whom it passes on to."""

    def __init__(self, cluster: Cluster) -> None:
        rank, size = cluster.rank, cluster.size
        self.group = cluster.group
        self.upstream = (rank + 1) % size
        self.downstream = size - 1 if rank == 0 else (rank - 1 if rank > 1 else None)

    def send(self, message: bytes) -> None:
        if self.downstream is None:
            return
        head = len(message).to_bytes(8, "little") + message[: FRAME_BYTES - 8]
        parts = [head.ljust(FRAME_BYTES, b"\0")]
        if len(message) > FRAME_BYTES - 8:
            parts.append(message[FRAME_BYTES - 8 :])
        for part in parts:  # one at a time: two sends in one eval may go out in either order
            array = mx.array(np.frombuffer(part, np.uint8))
            mx.eval(mx.distributed.send(array, self.downstream, group=self.group))

    def receive(self) -> bytes:
        frame = self._receive(FRAME_BYTES)
        length = int.from_bytes(frame[:8], "little")
        message = frame[8 : 8 + length]
        if length > FRAME_BYTES - 8:
            message += self._receive(length - (FRAME_BYTES - 8))
        return message

    def _receive(self, size: int) -> bytes:
        data = mx.distributed.recv((size,), mx.uint8, self.upstream, group=self.group)
        mx.eval(data)
        return np.asarray(data).tobytes()  # a view of the array's memory, then one copy


def encode(op: Op, model: str = "", body: bytes = b"") -> bytes:
    return bytes(Writer().uint(op).text(model).raw(body).data)


def decode(message: bytes) -> tuple[Op, str, bytes]:
    read = Reader(message)
    return Op(read.uint()), read.text(), bytes(read.raw())


class RankZero:
    """Rank 0's side: a method per message, and the watchdog over work the ranks share.

    On one rank every method does nothing (but ``load``, which loads).
    """

    def __init__(
        self,
        cluster: Cluster,
        step_timeout_s: float,
        on_lost: Callable[[str], None],
        max_step_s: float | None = None,
    ) -> None:
        self.cluster = cluster
        self.link = Link(cluster) if cluster.distributed else None
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

    # ---- the messages --------------------------------------------------------------------

    def idle(self, sleep_s: float) -> None:
        """Let the others sleep: MLX's backends spin while a rank waits to receive."""
        self._say(Op.IDLE, body=Writer().uint(round(sleep_s * 1000)).data)

    def stop(self) -> None:
        self._say(Op.STOP)

    def unload(self, model: str) -> None:
        self._say(Op.UNLOAD, model)

    def reset(self, model: str) -> None:
        """Have the others forget every sequence and cache of ``model`` (after an error)."""
        self._say(Op.RESET, model)

    def announcer(self, model: str) -> Callable[[StepPlan], None] | None:
        """What sends each step plan of ``model`` on to the other ranks, if there are any."""
        if not self.distributed:
            return None
        return lambda plan: self._say(Op.STEP, model, plan.encode())

    def load(self, name: str, load_model: Callable[[str], ServedModel]) -> ServedModel:
        """Load on every rank at once; fail (everywhere) if any rank fails.

        Not capped: downloading weights takes as long as it takes, while the ranks beat.
        """
        return self._together(lambda: self._load_everywhere(name, load_model), None)

    def _say(self, op: Op, model: str = "", body: bytes | bytearray = b"") -> None:
        link = self.link
        if link is not None:
            message = encode(op, model, bytes(body))
            self.together(lambda: link.send(message))

    def _load_everywhere(self, name: str, load_model: Callable[[str], ServedModel]) -> ServedModel:
        if self.link is not None:
            self.link.send(encode(Op.LOAD, name))
        model, error = None, None
        try:
            model = load_model(name)
        except Exception as exc:
            error = exc
        statuses = self.cluster.gather(0 if error else 1)
        failed = [rank for rank, ok in enumerate(statuses) if not ok]
        if failed:
            if len(failed) < len(statuses) and self.link is not None:
                self.link.send(encode(Op.UNLOAD, name))
            if error is not None:
                raise error
            raise MlxserveError(
                f"rank {', '.join(map(str, failed))} could not load model {name!r} "
                f"(see that rank's log)"
            )
        assert model is not None  # it loaded here (else error is set)
        if self.distributed and model.placement is not None:
            log.info("model %s: %s", name, model.placement.describe())
        return model

    # ---- the watchdog --------------------------------------------------------------------

    def together(self, work: Callable[[], Any]) -> Any:
        """Run work that the other ranks take part in, under the watchdog."""
        return self._together(work, self.max_step_s)

    def _together(self, work: Callable[[], Any], max_s: float | None) -> Any:
        if not self.distributed or self._in_flight is not None:  # or within work already
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

    def _listen(self) -> HeartbeatListener | None:
        address = self.cluster.rank_zero_address
        if address is None:
            log.warning(
                "rank 0's address is not known (neither `mlxserve launch` nor a ring hostfile "
                "gave it): a step longer than the step timeout ends the group"
            )
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


class Follower:
    """Every other rank's side: receive each message, pass it on, and do what it says.

    Beats to rank 0 all along, so that it can tell this rank working from this rank gone; and
    calls ``on_lost`` (from the heartbeat's thread: this one may be waiting on the ring for
    good) once rank 0, having answered the beats, stops answering for the step timeout.
    """

    def __init__(
        self,
        cluster: Cluster,
        load_model: Callable[[str], ServedModel],
        settings: EngineSettings,
        on_lost: Callable[[str], None] | None = None,
    ) -> None:
        self.cluster = cluster
        self.on_lost = on_lost
        self.link = Link(cluster)
        self.load_model = load_model
        self.settings = settings
        self.runners: dict[str, ModelRunner] = {}
        self.stopped = False
        self.slow_step_s = float(os.environ.get(SLOW_STEP_ENV) or 0)

    def run(self) -> None:
        """Follow rank 0 until it says stop.

        Raises:
            RuntimeError: when rank 0 (or another rank) is gone: the group cannot go on.
            Exception: anything a step or reset raised: this rank cannot stay in step.
        """
        heartbeat = None
        if self.cluster.rank_zero_address is not None:
            timeout = self.settings.step_timeout_s
            heartbeat = HeartbeatSender(
                self.cluster.rank_zero_address,
                self.cluster.launch_token,
                self.cluster.rank,
                beat_interval(timeout),
                on_silent=self._rank_zero_silent if self.on_lost else None,
                silent_s=timeout,
            )
            heartbeat.start()
        try:
            while not self.stopped:
                message = self.link.receive()
                self.link.send(message)
                op, model, body = decode(message)
                getattr(self, f"on_{op.name.lower()}")(model, body)
        finally:
            if heartbeat is not None:
                heartbeat.stop()

    def _rank_zero_silent(self, seconds: float) -> None:
        assert self.on_lost is not None
        self.on_lost(
            f"rank 0 has not answered this rank's heartbeats for {seconds:.1f} s "
            f"([distributed] step_timeout_s {self.settings.step_timeout_s:g} s): it is gone "
            f"or cut off"
        )

    def on_idle(self, model: str, body: bytes) -> None:
        time.sleep(Reader(body).uint() / 1000)

    def on_stop(self, model: str, body: bytes) -> None:
        self.stopped = True

    def on_load(self, model: str, body: bytes) -> None:
        try:
            served = self.load_model(model)
            self.runners[model] = make_runner(served, self.settings, lockstep=True)
            log.info("loaded model %s: %s", model, served.placement)
            ok = 1
        except Exception:
            log.exception("loading model %s failed", model)
            ok = 0
        self.cluster.gather(ok)

    def on_unload(self, model: str, body: bytes) -> None:
        self.runners.pop(model, None)

    def on_reset(self, model: str, body: bytes) -> None:
        self.runners[model].reset()

    def on_step(self, model: str, body: bytes) -> None:
        if self.slow_step_s:
            time.sleep(self.slow_step_s)
        self.runners[model].run(StepPlan.decode(body))


def follow(
    cluster: Cluster,
    load_model: Callable[[str], ServedModel],
    settings: EngineSettings,
    on_lost: Callable[[str], None] | None = None,
) -> None:
    """Load, unload and run each step of each model as rank 0 says, until it says stop;
    ``on_lost`` (which must end the process) if rank 0 stops answering the heartbeats."""
    Follower(cluster, load_model, settings, on_lost).run()
