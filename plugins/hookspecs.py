"""Every hook mlxserve calls, in one place; plugins implement them with ``@hookimpl``.

A family plugin usually implements only :func:`mlxserve_families`. The other hooks let a
plugin replace one piece of another family (a better sharding rule, a different KV cache,
a tool-call or reasoning format)
without copying it; mlxserve's own behaviour is itself a ``trylast`` implementation of each,
so any plugin's answer comes first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import mlx.nn as nn

    from mlxserve.core.kv.caches import KVCacheOptions
    from mlxserve.core.model.layout import DecoderLayout
    from mlxserve.plugins.family import ModelFamily
    from mlxserve.plugins.reasoning import ReasoningFormat
    from mlxserve.plugins.tool_calls import ToolCallFormat

PROJECT = "mlxserve"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# ---- Families -------------------------------------------------------------------------


@hookspec
def mlxserve_families() -> Sequence[ModelFamily]:
    """Declare the model families this plugin provides.

    :return: one :class:`~mlxserve.plugins.ModelFamily` instance per family.

    Every plugin's answer is collected. When two families claim one ``model_type``, a
    third-party family wins over a built-in one; two third-party families claiming it are a
    conflict that a ``[models.NAME] family`` entry must settle.
    """
    raise NotImplementedError  # a specification: pluggy calls the plugins' implementations


# ---- Sharding rules and KV caches -----------------------------------------------------


@hookspec(firstresult=True)
def mlxserve_sharding_rule(family: ModelFamily, model: nn.Module) -> DecoderLayout | None:
    """Give the pipeline layout of ``model``: where its embedding, layers, norm and head live.

    :param family: the family that built ``model``.
    :param model: the model, built but not necessarily loaded.
    :return: a :class:`~mlxserve.core.model.layout.DecoderLayout`, or None to leave it to others.

    First non-None result wins; the default is ``family.layout(model)``.
    """


@hookspec(firstresult=True)
def mlxserve_kv_cache_factory(
    family: ModelFamily, model: nn.Module, options: KVCacheOptions, layers: Sequence[int]
) -> list[Any] | None:
    """Build the KV caches for the given layers of ``model``.

    :param family: the family that built ``model``.
    :param model: the model the caches are for.
    :param options: the operator's ``[kv_cache]`` choices (e.g. ``bits``).
    :param layers: indices of the layers this rank runs, in order.
    :return: one cache per index in ``layers``, or None to leave it to others.

    First non-None result wins; the default is ``family.make_cache(model, options, layers)``.
    """


# ---- Chat -----------------------------------------------------------------------------


@hookspec(firstresult=True)
def mlxserve_chat_template(family: ModelFamily, tokenizer: Any) -> str | None:
    """Give the Jinja chat template for a checkpoint's tokenizer.

    :param family: the checkpoint's family.
    :param tokenizer: the Hugging Face tokenizer loaded from the checkpoint.
    :return: a template, or None to leave it to others.

    First non-None result wins; the default is the tokenizer's own template, else the
    family's ``chat_template``.
    """


@hookspec(firstresult=True)
def mlxserve_tool_call_format(family: ModelFamily) -> ToolCallFormat | None:
    """Give the tool-call format of a family's models: how tools go into the prompt, how
    the model writes a call, how calls are parsed and which grammar forces one.

    :param family: the model's family.
    :return: a :class:`~mlxserve.plugins.tool_calls.ToolCallFormat`, or None to leave it
        to others.

    First non-None result wins; the default is ``family.tool_call_format``, which is None
    for a family whose models cannot call tools.
    """


@hookspec(firstresult=True)
def mlxserve_reasoning_format(family: ModelFamily) -> ReasoningFormat | None:
    """Give the reasoning format of a family's models: whether a prompt opens a reasoning
    block, how the reply's reasoning is told from its answer, and what ends the reasoning.

    :param family: the model's family.
    :return: a :class:`~mlxserve.plugins.reasoning.ReasoningFormat`, or None to leave it
        to others.

    First non-None result wins; the default is ``family.reasoning_format``, which is None
    for a family whose models do not think aloud.
    """
