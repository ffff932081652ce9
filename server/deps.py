"""Request dependencies: the app's config, engine and registry, and API-key checking."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request

from mlxserve.core.config.schema import Config
from mlxserve.core.engine.engine import Engine
from mlxserve.core.metrics import EngineMetrics
from mlxserve.registry.models import ModelRegistry
from mlxserve.server.errors import AuthError


def get_config(request: Request) -> Config:
    return request.app.state.config


def get_engine(request: Request) -> Engine:
    return request.app.state.engine


def get_registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


def get_metrics(request: Request) -> EngineMetrics:
    return request.app.state.metrics


ConfigDep = Annotated[Config, Depends(get_config)]
EngineDep = Annotated[Engine, Depends(get_engine)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
MetricsDep = Annotated[EngineMetrics, Depends(get_metrics)]


def _presented_keys(request: Request) -> list[bytes]:
    # Header values arrive as latin-1 text: back to their raw bytes, compared as bytes
    # (compare_digest refuses non-ASCII str).
    keys = []
    scheme, _, token = request.headers.get("authorization", "").encode("latin-1").partition(b" ")
    if scheme.lower() == b"bearer":
        keys.append(token.strip())
    if "x-api-key" in request.headers:  # Anthropic's clients send this one
        keys.append(request.headers["x-api-key"].encode("latin-1").strip())
    return keys


def require_api_key(request: Request, config: ConfigDep) -> None:
    """With ``[server] api_keys`` set, every call needs ``Authorization: Bearer <key>`` or
    ``x-api-key: <key>``."""
    keys = config.server.api_keys
    if not keys:
        return
    presented = _presented_keys(request)
    if not any(secrets.compare_digest(given, key.encode()) for given in presented for key in keys):
        raise AuthError(
            "invalid or missing API key; send 'Authorization: Bearer <key>' or 'x-api-key: <key>'"
        )
