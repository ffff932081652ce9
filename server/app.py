"""The app factory: one FastAPI app per config, holding its engine and registry."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import version

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from mlxserve.core.config.schema import Config
from mlxserve.core.distributed.cluster import Cluster
from mlxserve.core.engine.engine import Engine
from mlxserve.core.engine.settings import EngineSettings
from mlxserve.core.metrics import EngineMetrics
from mlxserve.registry.models import ModelRegistry
from mlxserve.registry.plugins import Plugins, load_plugins
from mlxserve.server.errors import install_error_handlers
from mlxserve.server.http.edge import EdgeMiddleware
from mlxserve.server.http.limits import BodyLimitMiddleware
from mlxserve.server.routes import (
    admin,
    chat,
    completions,
    docs,
    health,
    messages,
    metrics,
    models,
    responses,
    ui,
)

log = logging.getLogger(__name__)


def engine_settings(config: Config) -> EngineSettings:
    return EngineSettings.from_config(config)


def create_app(
    config: Config,
    *,
    plugins: Plugins | None = None,
    engine: Engine | None = None,
    cluster: Cluster | None = None,
) -> FastAPI:
    """Build the server for ``config`` (rank 0's, on several ranks); the engine starts and
    stops with the app."""
    plugins = plugins or load_plugins(config.plugins.enabled, trace=config.plugins.trace)
    registry = ModelRegistry(config, plugins, cluster)
    alone = ModelRegistry(config, plugins) if registry.cluster.distributed else registry
    engine = engine or Engine(
        lambda name: registry.load(name, download=True),
        engine_settings(config),
        cluster,
        load_alone=lambda name: alone.load(name, download=True),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            default, _ = config.resolve_model()
            model = await engine.model(default)
            note = " (random weights: for trying things out)" if model.random_weights else ""
            log.info("serving %s%s", model.name, note)
        except Exception as exc:  # keep serving: other models may still work
            log.error("could not load the default model: %s", exc)
        yield
        engine.stop()

    app = FastAPI(
        title="mlxserve",
        version=version("mlxserve"),
        lifespan=lifespan,
        # served by routes.docs, behind the API key
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.config = config
    app.state.engine = engine
    app.state.registry = registry
    app.state.metrics = EngineMetrics(engine)
    app.add_middleware(  # inside CORS, so a 413 still carries CORS headers
        BodyLimitMiddleware,
        max_bytes=config.server.max_request_bytes,
        rejected=app.state.metrics.http_error,
    )
    app.add_middleware(  # inside CORS too; outside the body limit: refused before reading
        EdgeMiddleware,
        bind_host=config.server.host,
        allowed_hosts=config.server.allowed_hosts,
        cors_origins=config.server.cors_origins,
        rejected=app.state.metrics.http_error,
    )
    if config.server.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.server.cors_origins),
            allow_methods=["*"],
            allow_headers=["*"],
        )
    install_error_handlers(app)
    routers = (chat, completions, responses, messages, models, admin, health, metrics, docs, ui)
    for module in routers:
        app.include_router(module.router)
    return app
