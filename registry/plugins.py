"""The plugin manager: finds plugins by entry point, honours the allow-list, indexes families."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any, cast

import pluggy

from mlxserve.core.errors import UnknownModelTypeError, UnsupportedModelError
from mlxserve.core.sampling.params import DEFAULTABLE_PARAMS, InvalidParameterError, SamplingParams
from mlxserve.plugins import defaults, hookspecs
from mlxserve.plugins.families.generic import ANY_MODEL_TYPE, mlx_lm_module
from mlxserve.plugins.family import ModelFamily
from mlxserve.plugins.gguf_mapping import UNMAPPED_ARCHITECTURES
from mlxserve.plugins.reasoning import ReasoningFormat
from mlxserve.plugins.tool_calls import ToolCallFormat

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "mlxserve.plugins"
BUILTIN_PACKAGE = "mlxserve"


@dataclass(frozen=True)
class PluginInfo:
    """One plugin as found: where it comes from and whether it loaded."""

    name: str
    module: str
    package: str
    version: str
    builtin: bool
    error: str | None = None


@dataclass(frozen=True)
class FamilyEntry:
    family: ModelFamily
    plugin: PluginInfo


class Plugins:
    """The loaded plugins and the families they provide."""

    def __init__(self, pm: pluggy.PluginManager, infos: Sequence[PluginInfo]) -> None:
        self.pm = pm
        self.infos = list(infos)
        self.hook = pm.hook
        by_name = {info.name: info for info in self.infos}
        self.families: list[FamilyEntry] = []
        for impl in pm.hook.mlxserve_families.get_hookimpls():
            module = getattr(impl.plugin, "__name__", type(impl.plugin).__module__)
            info = by_name.get(impl.plugin_name) or PluginInfo(
                impl.plugin_name, module, "(registered)", "", builtin=False
            )
            errors = []
            try:
                # whatever the plugin answers: family_problems checks each one
                families = list(cast("Iterable[Any]", impl.function()))
            except Exception as exc:  # a broken plugin must not take the server down
                families, errors = [], [f"mlxserve_families() raised {type(exc).__name__}: {exc}"]
            for family in families:
                problems = family_problems(family)
                if problems:
                    errors.append(
                        f"family {getattr(family, 'name', family)!r}: {'; '.join(problems)}"
                    )
                else:
                    self.families.append(FamilyEntry(family, info))
            if errors:
                error = "; ".join(errors)
                log.error("plugin %r (%s) is skipped: %s", info.name, info.package, error)
                self._record_error(info, error)

    def _record_error(self, info: PluginInfo, error: str) -> None:
        failed = dataclasses.replace(info, error=error)
        if info in self.infos:
            self.infos[self.infos.index(info)] = failed
        else:
            self.infos.append(failed)

    def family(self, name: str) -> ModelFamily:
        """The family called ``name``."""
        for entry in self.families:
            if entry.family.name == name:
                return entry.family
        known = ", ".join(sorted(e.family.name for e in self.families)) or "none"
        raise UnknownModelTypeError(f"no enabled plugin provides family {name!r} (have: {known})")

    def family_for(self, model_type: str) -> ModelFamily:
        """The family that serves checkpoints of ``model_type``.

        A third-party family wins over a built-in one; two third-party families claiming
        the same model_type are a conflict the operator settles with ``[models.NAME] family``.
        """
        claims = [e for e in self.families if model_type in e.family.model_types]
        if not claims:
            claims = [e for e in self.families if ANY_MODEL_TYPE in e.family.model_types]
            if claims and mlx_lm_module({"model_type": model_type}) is None:
                raise UnknownModelTypeError(
                    f"model_type {model_type!r} is not supported: no enabled plugin claims "
                    f"it and mlx-lm {mlx_lm_version()} has no model of it"
                )
        if not claims:
            known = ", ".join(
                sorted({t for e in self.families for t in e.family.model_types} - {"*"})
            )
            raise UnknownModelTypeError(
                f"no enabled plugin claims model_type {model_type!r} "
                f"(claimed: {known or 'none'}); install a plugin for it or check [plugins] enabled"
            )
        return _first_claim(claims, f"model_type {model_type!r}")

    def family_for_gguf(self, architecture: str) -> ModelFamily:
        """The family that converts GGUF files of ``architecture``, by the same rules."""
        claims = [e for e in self.families if architecture in e.family.gguf_architectures]
        if not claims:
            archs = {a for e in self.families for a in e.family.gguf_architectures}
            known = ", ".join(sorted(archs))
            reason = UNMAPPED_ARCHITECTURES.get(architecture)
            why = f"; mlxserve's own families do not convert it: {reason}" if reason else ""
            raise UnsupportedModelError(
                f"no enabled plugin converts GGUF architecture {architecture!r} "
                f"(converted: {known or 'none'}){why}; install a plugin for it, or serve an "
                f"MLX checkpoint of the model instead"
            )
        return _first_claim(claims, f"GGUF architecture {architecture!r}")


def _first_claim(claims: list[FamilyEntry], what: str) -> ModelFamily:
    third_party = [e for e in claims if not e.plugin.builtin]
    if len(third_party) > 1:
        names = ", ".join(f"{e.family.name} ({e.plugin.package})" for e in third_party)
        raise UnknownModelTypeError(
            f"{what} is claimed by several plugins: {names}; "
            f'choose one with `family = "..."` in the model\'s [models.NAME] entry'
        )
    return (third_party or claims)[0].family


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _sampling_problems(defaults: object) -> list[str]:
    if not isinstance(defaults, Mapping):
        return ["sampling_defaults must be a dict"]
    unknown = sorted(str(key) for key in defaults if key not in DEFAULTABLE_PARAMS)
    if unknown:
        known = ", ".join(DEFAULTABLE_PARAMS)
        return [f"sampling_defaults has unknown keys {', '.join(unknown)} (known: {known})"]
    if not all(_is_number(value) for value in defaults.values()):
        return ["sampling_defaults values must be numbers"]
    if not isinstance(defaults.get("top_k", 0), int):
        return ["sampling_defaults top_k must be an integer"]
    try:
        SamplingParams(**defaults)
    except InvalidParameterError as exc:
        return [f"sampling_defaults {exc}"]
    return []


def family_problems(family: object) -> list[str]:
    """What is wrong with a family a plugin declares (empty when it can be used)."""
    problems = []
    name = getattr(family, "name", None)
    if not isinstance(name, str) or not name:
        problems.append("name must be a non-empty string")
    types = getattr(family, "model_types", None)
    if not (
        isinstance(types, (tuple, list)) and types and all(isinstance(t, str) and t for t in types)
    ):
        problems.append("model_types must be a non-empty tuple of non-empty strings")
    archs = getattr(family, "gguf_architectures", ())
    if not (isinstance(archs, (tuple, list)) and all(isinstance(a, str) and a for a in archs)):
        problems.append("gguf_architectures must be a tuple of non-empty strings")
    stops = getattr(family, "stop_tokens", None)
    if not (isinstance(stops, (tuple, list)) and all(isinstance(t, str) and t for t in stops)):
        problems.append("stop_tokens must be a tuple of non-empty strings")
    fmt = getattr(family, "tool_call_format", None)
    if fmt is not None and not isinstance(fmt, ToolCallFormat):
        problems.append("tool_call_format must be a ToolCallFormat or None")
    reasoning = getattr(family, "reasoning_format", None)
    if reasoning is not None and not isinstance(reasoning, ReasoningFormat):
        problems.append("reasoning_format must be a ReasoningFormat or None")
    return problems + _sampling_problems(getattr(family, "sampling_defaults", {}))


def _load_entry_points(pm: pluggy.PluginManager, enabled: Sequence[str] | None) -> list[PluginInfo]:
    infos = []
    found = entry_points(group=ENTRY_POINT_GROUP)
    for ep in sorted(found, key=lambda ep: ep.name):
        if enabled is not None and ep.name not in enabled:
            continue
        if pm.has_plugin(ep.name):
            continue
        package = ep.dist.name if ep.dist else "(unknown)"
        version = ep.dist.version if ep.dist else ""
        builtin = package == BUILTIN_PACKAGE
        try:
            module = ep.load()
        except Exception as exc:  # a broken plugin must not take the server down
            error = f"{type(exc).__name__}: {exc}"
            log.error("plugin %r (%s) failed to load and is skipped: %s", ep.name, package, error)
            infos.append(PluginInfo(ep.name, ep.value, package, version, builtin, error))
            continue
        pm.register(module, name=ep.name)
        infos.append(PluginInfo(ep.name, ep.value, package, version, builtin))
    if enabled is not None:
        missing = sorted(set(enabled) - {ep.name for ep in found})
        if missing:
            log.warning(
                "plugins.enabled names %s, not installed (installed: %s)",
                ", ".join(missing),
                ", ".join(sorted(ep.name for ep in found)),
            )
    return infos


def load_plugins(
    enabled: Sequence[str] | None = None,
    *,
    trace: bool = False,
    extra: Sequence[tuple[str, ModuleType | object]] = (),
) -> Plugins:
    """Create the plugin manager and load every enabled plugin.

    Args:
        enabled: the allow-list of plugin (entry point) names; None loads every plugin.
        trace: log each hook call and its result at debug level.
        extra: (name, plugin) pairs registered directly, after the entry points.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(defaults, name="mlxserve.defaults")
    infos = _load_entry_points(pm, enabled)
    for name, plugin in extra:
        pm.register(plugin, name=name)
    if trace:
        pm.trace.root.setwriter(lambda message: log.debug("hook: %s", message.rstrip()))
        pm.enable_tracing()
    return Plugins(pm, infos)


def mlx_lm_version() -> str:
    from importlib.metadata import version

    return version("mlx-lm")
