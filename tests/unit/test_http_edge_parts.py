"""The HTTP edge's parts in-process: how many connections the open-files limit allows, the
filter that lets a repeated log line through once per interval, and the [server] keys for
hosts, connections and deadlines."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from mlxserve.core.config.schema import ConfigError, load_config
from mlxserve.server.http.connections import RepeatFilter, connection_plan


def test_the_default_cap_leaves_room_for_the_server_and_for_bursts() -> None:
    assert connection_plan(None, 20000) == (1024, 2048)
    assert connection_plan(None, 512) == (224, 74)
    assert connection_plan(None, -1) == (1024, 2048)  # unlimited
    assert connection_plan(50, 512) == (50, 132)
    assert connection_plan(5000, 512) == (5000, 16)


def test_a_repeated_log_line_is_let_through_once_per_interval() -> None:
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger("mlxserve.test_http_edge")
    logger.propagate = False
    handler = Keep()
    logger.addHandler(handler)
    repeat = RepeatFilter(("socket.accept() out of system resource",), interval=0.3)
    logger.addFilter(repeat)
    try:
        for _ in range(5000):
            logger.error("socket.accept() out of system resource\nsocket: <fd=6>")
        logger.error("something else")
        time.sleep(0.35)
        logger.error("socket.accept() out of system resource\nsocket: <fd=6>")
    finally:
        logger.removeFilter(repeat)
        logger.removeHandler(handler)
    assert len(records) == 3, records
    assert "(4999 more like it in the last 0.3 s)" in records[2]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("allowed_hosts = ['http://x.test']", "server.allowed_hosts[0]: 'http://x.test' must be"),
        ("allowed_hosts = ['ok.test', 'x.test:80']", "server.allowed_hosts[1]: 'x.test:80'"),
        ("allowed_hosts = ['a b']", "server.allowed_hosts[0]: 'a b' must be a host name"),
        ("allowed_hosts = 'x.test'", "server.allowed_hosts: must be a list (got 'x.test')"),
        ("header_timeout_s = 0", "server.header_timeout_s: must be greater than 0 (got 0"),
        ("body_timeout_s = -1", "server.body_timeout_s: must be greater than 0 (got -1"),
        ("max_connections = 0", "server.max_connections: must be at least 1 (got 0)"),
        ("max_connections = true", "server.max_connections: must be an integer (got true)"),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "mlxserve.toml"
    path.write_text(f"[server]\n{text}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value).startswith(f"{path}: {expected}"), str(info.value)


def test_config_keys_and_environment() -> None:
    server = load_config(env={}).server
    assert server.allowed_hosts == [] and server.max_connections is None
    assert (server.header_timeout_s, server.body_timeout_s) == (10.0, 60.0)
    env = {
        "MLXSERVE_SERVER__ALLOWED_HOSTS": '["llm.lan", "[::1]", "10.0.0.2", "*"]',
        "MLXSERVE_SERVER__MAX_CONNECTIONS": "300",
        "MLXSERVE_SERVER__HEADER_TIMEOUT_S": "2.5",
    }
    server = load_config(env=env).server
    assert server.allowed_hosts == ["llm.lan", "[::1]", "10.0.0.2", "*"]
    assert (server.max_connections, server.header_timeout_s) == (300, 2.5)
    with pytest.raises(ConfigError, match="^MLXSERVE_SERVER__MAX_CONNECTIONS: server.max_conn"):
        load_config(env={"MLXSERVE_SERVER__MAX_CONNECTIONS": "0"})
