"""/admin: load and unload models without a restart."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from mlxserve.server.deps import ConfigDep, EngineDep, RegistryDep, require_api_key
from mlxserve.server.http.body import OffLoopJsonRoute
from mlxserve.server.protocol.openai import ModelCard, ModelList
from mlxserve.server.routes.models import model_card

router = APIRouter(
    prefix="/admin",
    tags=["admin"],
    dependencies=[Depends(require_api_key)],
    route_class=OffLoopJsonRoute,
)


@router.get("/models", response_model=ModelList)
async def loaded_models(config: ConfigDep, engine: EngineDep, registry: RegistryDep) -> ModelList:
    """The models loaded now, least recently used first."""
    names = engine.loaded_models()
    return ModelList(data=[model_card(config, engine, registry.store, n) for n in names])


@router.post("/models/{name}/load", response_model=ModelCard)
async def load_model(
    name: str, config: ConfigDep, engine: EngineDep, registry: RegistryDep
) -> ModelCard:
    """Load a model (unloading the least recently used idle one if there is no room)."""
    canonical, _ = config.resolve_model(name)
    await engine.model(canonical)
    return model_card(config, engine, registry.store, canonical)


@router.post("/models/{name}/unload", response_model=ModelCard)
async def unload_model(
    name: str, config: ConfigDep, engine: EngineDep, registry: RegistryDep
) -> ModelCard:
    """Unload a model; 409 while it has running requests."""
    canonical, _ = config.resolve_model(name)
    await engine.unload(canonical)
    return model_card(config, engine, registry.store, canonical)
