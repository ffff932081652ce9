"""The engine's metrics without a server: each engine has its own Prometheus registry."""

from __future__ import annotations

from collections import OrderedDict
from types import SimpleNamespace

from prometheus_client import generate_latest

from mlxserve.core.metrics import EngineMetrics


def test_each_engine_has_its_own_registry() -> None:
    def fake_engine(depth: int) -> SimpleNamespace:
        return SimpleNamespace(workers=OrderedDict(), observers=[], queue_depth=lambda: depth)

    first, second = EngineMetrics(fake_engine(3)), EngineMetrics(fake_engine(5))
    assert first.engine.observers == [first.observe]
    assert b"mlxserve_requests_queued 3.0" in generate_latest(first.registry)
    assert b"mlxserve_requests_queued 5.0" in generate_latest(second.registry)
