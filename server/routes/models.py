"""GET /v1/models: the registry's names, their aliases, and which are loaded."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from mlxserve.core.config.schema import Config
from mlxserve.core.engine.engine import Engine
from mlxserve.registry.store import ModelStore
from mlxserve.server.deps import ConfigDep, EngineDep, RegistryDep, require_api_key
from mlxserve.server.protocol.openai import ModelCard, ModelList

router = APIRouter(prefix="/v1", tags=["models"], dependencies=[Depends(require_api_key)])


def model_card(config: Config, engine: Engine, store: ModelStore, name: str) -> ModelCard:
    entry = config.models[name]
    return ModelCard(
        id=name,
        aliases=list(entry.aliases),
        loaded=name in engine.loaded_models(),
        family=entry.family,
        random_weights=store.random_weights(entry.source),
        description=store.description(entry.source, entry.family),
    )


@router.get("/models", response_model=ModelList)
def list_models(config: ConfigDep, engine: EngineDep, registry: RegistryDep) -> ModelList:
    """Every model in the registry."""
    cards = [model_card(config, engine, registry.store, name) for name in config.models]
    return ModelList(data=cards)


@router.get("/models/{model_id}", response_model=ModelCard)
def get_model(
    model_id: str, config: ConfigDep, engine: EngineDep, registry: RegistryDep
) -> ModelCard:
    """One model, by name or alias."""
    name, _ = config.resolve_model(model_id)
    return model_card(config, engine, registry.store, name)
