"""GET /health and GET /: is the server serving, and what is it (a browser goes to /ui).

Both answer HEAD as GET, without the body (clients such as Claude Code probe the server with
``HEAD /``)."""

from __future__ import annotations

from importlib.metadata import version
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse

from mlxserve.server.deps import ConfigDep, EngineDep, require_api_key
from mlxserve.server.routes.ui import page_redirect, prefers_html

router = APIRouter(tags=["health"])


@router.get("/health")
@router.head("/health", include_in_schema=False)
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


@router.get("/", response_model=None)
@router.head("/", response_model=None, include_in_schema=False)
async def root(
    request: Request, response: Response, config: ConfigDep, engine: EngineDep
) -> dict[str, Any] | RedirectResponse:
    """What this server is, which models it has, and where to go next; a browser asking for
    HTML is sent to the web page (which needs no key: its data comes from keyed calls)."""
    if prefers_html(request):
        return page_redirect(request)
    require_api_key(request, config)
    response.headers["Vary"] = "Accept"
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
            "web_page": "/ui",
        },
    }
