"""GET /health and GET /: is the server serving, and what is it."""

from __future__ import annotations

from importlib.metadata import version
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from ..deps import ConfigDep, EngineDep, require_api_key

router = APIRouter(tags=["health"])


@router.get("/health")
async def health(engine: EngineDep) -> JSONResponse:
    """200 while the engine serves; 503 (saying why) when it cannot."""
    body: dict[str, Any] = {
        "status": "ok" if engine.alive else "unavailable",
        "loaded_models": engine.loaded_models(),
        "queued_requests": engine.queue_depth(),
        "ranks": engine.cluster.size,
    }
    placements = {
        name: {"strategy": p.strategy, "stages": [s.to_json() for s in p.stages]}
        for name, p in engine.placements().items()
    }
    if placements:
        body["placement"] = placements
    if not engine.alive:
        body["error"] = engine.error or "the engine is not running"
    return JSONResponse(body, status_code=200 if engine.alive else 503)


@router.get("/", dependencies=[Depends(require_api_key)])
async def root(config: ConfigDep, engine: EngineDep) -> dict[str, Any]:
    """What this server is, which models it has, and where to go next."""
    return {
        "name": "mlxserve",
        "version": version("mlxserve"),
        "default_model": config.registry.default_model,
        "models": list(config.models),
        "loaded_models": engine.loaded_models(),
        "links": {
            "openai_api": "/v1",
            "models": "/v1/models",
            "health": "/health",
            "docs": "/docs",
        },
    }
