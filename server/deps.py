"""Request dependencies: the app's config, engine and registry, and API-key checking."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request

from mlxserve.core.config import Config
from mlxserve.core.engine import Engine
from mlxserve.core.metrics import EngineMetrics
from mlxserve.registry.models import ModelRegistry

from .errors import AuthError


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


def require_api_key(request: Request, config: ConfigDep) -> None:
    """With ``[server] api_keys`` set, every call needs ``Authorization: Bearer <key>``."""
    keys = config.server.api_keys
    if not keys:
        return
    # Header values arrive as latin-1 text: back to their raw bytes, compared as bytes
    # (compare_digest refuses non-ASCII str).
    raw = request.headers.get("authorization", "").encode("latin-1")
    scheme, _, token = raw.partition(b" ")
    if scheme.lower() != b"bearer" or not any(
        secrets.compare_digest(token.strip(), key.encode()) for key in keys
    ):
        raise AuthError("invalid or missing API key; send 'Authorization: Bearer <key>'")
