"""What every rank but rank 0 does: follow rank 0's messages, step for step."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from .distributed import Cluster
from .engine import EngineSettings
from .plan import StepPlan
from .runner import ModelRunner
from .worker import ServedModel, make_runner

log = logging.getLogger(__name__)


def follow(
    cluster: Cluster, load_model: Callable[[str], ServedModel], settings: EngineSettings
) -> None:
    """Load, unload and run each step of each model as rank 0 says, until it says stop.

    Raises:
        RuntimeError: when rank 0 (or another rank) is gone: the group cannot go on.
    """
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
            runners[name].run(StepPlan.from_json(message["plan"]))
