"""The app factory: one FastAPI app per config, holding its engine and registry."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import version

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from mlxserve.core.config import Config
from mlxserve.core.distributed import Cluster
from mlxserve.core.engine import Engine, EngineSettings
from mlxserve.core.kv_cache import KVCacheOptions
from mlxserve.core.metrics import EngineMetrics
from mlxserve.registry.models import ModelRegistry
from mlxserve.registry.plugins import Plugins, load_plugins

from .errors import install_error_handlers
from .routes import admin, chat, completions, health, metrics, models

log = logging.getLogger(__name__)


def engine_settings(config: Config) -> EngineSettings:
    perf = config.performance
    return EngineSettings(
        max_batch_size=perf.max_batch_size,
        prefill_step_size=perf.prefill_step_size,
        queue_size=perf.queue_size,
        max_loaded_models=config.registry.max_loaded_models,
        max_sequence_length=config.kv_cache.max_sequence_length,
        kv_options=KVCacheOptions(bits=config.kv_cache.bits),
        step_timeout_s=config.distributed.step_timeout_s,
        kv_budget_kind=config.kv_cache.budget.kind,
        kv_budget_value=config.kv_cache.budget.value,
        reserved_memory_mb=config.kv_cache.reserved_memory_mb,
        block_size=config.kv_cache.block_size,
        disk_dir=str(config.kv_cache.disk_dir) if config.kv_cache.disk_dir else None,
        disk_max_bytes=int(config.kv_cache.disk_max_gb * 2**30),
        disk_write=config.kv_cache.disk_write,
    )


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
    engine = engine or Engine(
        lambda name: registry.load(name, download=True), engine_settings(config), cluster
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            default, _ = config.resolve_model(config.registry.default_model) or ("", None)
            model = await engine.model(default)
            note = " (random weights: for trying things out)" if model.random_weights else ""
            log.info("serving %s%s", model.name, note)
        except Exception as exc:  # keep serving: other models may still work
            log.error("could not load the default model: %s", exc)
        yield
        engine.stop()

    app = FastAPI(title="mlxserve", version=version("mlxserve"), lifespan=lifespan)
    app.state.config = config
    app.state.engine = engine
    app.state.registry = registry
    app.state.metrics = EngineMetrics(engine)
    if config.server.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.server.cors_origins),
            allow_methods=["*"],
            allow_headers=["*"],
        )
    install_error_handlers(app)
    for module in (chat, completions, models, admin, health, metrics):
        app.include_router(module.router)
    return app
