"""What every rank but rank 0 does: follow rank 0's messages, step for step."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from .distributed import Cluster
from .heartbeat import HeartbeatSender, beat_interval
from .plan import StepPlan
from .runner import ModelRunner
from .settings import EngineSettings
from .worker import ServedModel, make_runner

log = logging.getLogger(__name__)

# Tests only: make each step of this rank this many seconds slower (a slow rank, not a dead one).
SLOW_STEP_ENV = "MLXSERVE_TEST_SLOW_STEP_S"


def follow(
    cluster: Cluster, load_model: Callable[[str], ServedModel], settings: EngineSettings
) -> None:
    """Load, unload and run each step of each model as rank 0 says, until it says stop.

    Beats to rank 0 all along, so that it can tell this rank working from this rank gone.

    Raises:
        RuntimeError: when rank 0 (or another rank) is gone: the group cannot go on.
        Exception: anything a step or reset raised: this rank cannot stay in step.
    """
    heartbeat = None
    if cluster.rank_zero_address is not None:
        heartbeat = HeartbeatSender(
            cluster.rank_zero_address,
            cluster.launch_token,
            cluster.rank,
            beat_interval(settings.step_timeout_s),
        )
        heartbeat.start()
    try:
        _follow(cluster, load_model, settings, float(os.environ.get(SLOW_STEP_ENV) or 0))
    finally:
        if heartbeat is not None:
            heartbeat.stop()


def _follow(
    cluster: Cluster,
    load_model: Callable[[str], ServedModel],
    settings: EngineSettings,
    slow_step_s: float,
) -> None:
    runners: dict[str, ModelRunner] = {}
    while True:
        message = cluster.broadcast()
        op, name = message["op"], message.get("model")
        if op == "stop":
            return
        if op == "idle":
            time.sleep(message["sleep"])
        if op == "load":
            try:
                model = load_model(name)
                runners[name] = make_runner(model, settings, lockstep=True)
                log.info("loaded model %s: %s", name, getattr(model, "placement", None))
                ok = 1
            except Exception:
                log.exception("loading model %s failed", name)
                ok = 0
            cluster.gather(ok)
        elif op == "unload":
            runners.pop(name, None)
        elif op == "reset":
            runners[name].reset()
        elif op == "step":
            if slow_step_s:
                time.sleep(slow_step_s)
            runners[name].run(StepPlan.from_json(message["plan"]))
