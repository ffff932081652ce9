"""mlxserve configuration: a TOML file, layered with environment variables and CLI overrides."""

from __future__ import annotations

import difflib
import fnmatch
import ipaddress
import json
import math
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticKnownError

from mlxserve.core.distributed.hostfile import JACCL_BACKENDS, rdma_names, rdma_problems
from mlxserve.core.errors import ModelNotFoundError

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

DEFAULT_CONFIG_FILE = "mlxserve.toml"
ENV_PREFIX = "MLXSERVE_"
CONFIG_ENV_VAR = "MLXSERVE_CONFIG"
PLUGINS_ENV_VAR = "MLXSERVE_PLUGINS"
CLI_SOURCE = "command line"
_DEFAULT_MODEL_SOURCES = {"demo": "builtin:smollm2-135m-instruct"}
_UNIT_BYTES = {"mb": 2**20, "mib": 2**20, "gb": 2**30, "gib": 2**30}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(mb|mib|gb|gib)", re.IGNORECASE)
_HUB_ID = re.compile(r"[A-Za-z0-9._-]+/[A-Za-z0-9._-]+")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_LOCAL_PREFIXES = ("/", "./", "../", "~")
_RDMA_DEVICE = re.compile(r"[A-Za-z0-9_.:-]+")
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_MODEL_NAME_RULE = (
    "at most 128 letters, digits, '.', '_', ':' or '-', starting with a letter or digit, "
    "without '..'"
)

Loc = tuple[str | int, ...]


class ConfigError(Exception):
    """Invalid configuration. ``str()`` is the whole message, one line per problem."""

    def __init__(self, problems: str | list[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class _CrossFieldError(ValueError):
    def __init__(self, problems: list[tuple[Loc, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{_dotted(loc)}: {message}" for loc, message in problems))


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _dotted(loc: Loc) -> str:
    parts = []
    for part in loc:
        if isinstance(part, int):
            parts.append(f"[{part}]")
        else:
            key = part if _BARE_KEY.fullmatch(part) else json.dumps(part, ensure_ascii=False)
            parts.append(f".{key}" if parts else key)
    return "".join(parts)


def _bounds(
    low: float | None = None, high: float | None = None, *, above: float | None = None
) -> AfterValidator:
    """Range check with a friendly message; written so that NaN fails it."""
    if above is not None:
        wanted = f"greater than {above}" + (f" and at most {high}" if high is not None else "")
    elif low is not None and high is not None:
        wanted = f"between {low} and {high}"
    else:
        wanted = f"at least {low}" if low is not None else f"at most {high}"

    def check(value: float) -> float:
        ok = (above is None or value > above) and (low is None or value >= low)
        if not (ok and (high is None or value <= high)):
            raise ValueError(f"must be {wanted} (got {_show(value)})")
        return value

    return AfterValidator(check)


def _reject_bool(error_type: Literal["int_type", "float_type"]) -> BeforeValidator:
    def check(value: Any) -> Any:
        if isinstance(value, bool):  # pydantic would quietly accept true as 1
            raise PydanticKnownError(error_type)
        return value

    return BeforeValidator(check)


def _power_of_two(value: int) -> int:
    if not 1 <= value <= 1024 or value & (value - 1):
        raise ValueError(f"must be a power of two between 1 and 1024 (got {value})")
    return value


Int = Annotated[int, _reject_bool("int_type")]
Float = Annotated[float, _reject_bool("float_type")]
PositiveInt = Annotated[Int, _bounds(1)]
NonNegativeInt = Annotated[Int, _bounds(0)]
PositiveFloat = Annotated[Float, _bounds(above=0)]
Port = Annotated[Int, _bounds(1, 65535)]
BlockSize = Annotated[Int, AfterValidator(_power_of_two)]
SequenceLength = Annotated[Int, _bounds(16)]
ExpandedPath = Annotated[Path, AfterValidator(lambda path: path.expanduser())]


def _check_api_key(key: str) -> str:
    # Never echo the key: this message ends up in logs and `config check` output.
    if not key or not all("!" <= char <= "~" for char in key):
        raise ValueError("an API key must be non-empty printable ASCII without spaces")
    return key


ApiKey = Annotated[str, AfterValidator(_check_api_key)]
_HOST_NAME = re.compile(r"(\*\.)?[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?")


def _check_allowed_host(host: str) -> str:
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(bare)
        return host
    except ValueError:
        pass
    if host == "*" or (len(host) <= 255 and _HOST_NAME.fullmatch(host)):
        return host
    raise ValueError(
        f"{_show(host)} must be a host name such as 'example.com' or '*.example.com', an IP "
        "address, or '*' (no scheme, port or path)"
    )


AllowedHost = Annotated[str, AfterValidator(_check_allowed_host)]


def valid_model_name(name: str) -> bool:
    """Whether ``name`` may name a model: a safe file-name-like word, never a path."""
    return bool(_MODEL_NAME.fullmatch(name)) and ".." not in name


def valid_alias(alias: str) -> bool:
    """Whether ``alias`` may be an alias: a model name, or several joined by single '/'
    (so Hub ids such as ``org/repo`` can be aliases)."""
    return len(alias) <= 256 and all(valid_model_name(part) for part in alias.split("/"))


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class KVBudget(_Section):
    """KV-cache budget: ``auto`` (value 0), a number of tokens, or a number of bytes."""

    kind: Literal["auto", "tokens", "bytes"]
    value: int

    @classmethod
    def parse(cls, raw: Any) -> KVBudget:
        """Parse ``"auto"``, a token count, or a size such as ``"512MB"``/``"1.5GiB"``.

        MB/MiB both mean 2**20 bytes and GB/GiB 2**30.

        Raises:
            ValueError: with a human-readable message.
        """
        if isinstance(raw, KVBudget):
            return raw
        text = raw.strip().lower() if isinstance(raw, str) else None
        if text == "auto":
            return cls(kind="auto", value=0)
        if text is not None and text.isdigit():
            raw = int(text)
        if isinstance(raw, int) and not isinstance(raw, bool):
            if raw < 1:
                raise ValueError(f"must be at least 1 token (got {raw})")
            return cls(kind="tokens", value=raw)
        size = _SIZE.fullmatch(text) if text is not None else None
        if size:
            value = round(float(size[1]) * _UNIT_BYTES[size[2]])
            if value < 1:
                raise ValueError(f"must be a positive size (got {_show(raw)})")
            return cls(kind="bytes", value=value)
        raise ValueError(
            f"must be 'auto', a token count, or a size like '512MB' or '2GB' (got {_show(raw)})"
        )

    def to_setting(self) -> str | int:
        """Return the form to write in TOML: ``"auto"``, an int, or the shortest exact size."""
        if self.kind != "bytes":
            return "auto" if self.kind == "auto" else self.value
        sizes = []
        for unit in ("MB", "GB"):
            amount = self.value / _UNIT_BYTES[unit.lower()]
            text = repr(amount) if "e" not in repr(amount) else f"{amount:.30f}"
            text = text.rstrip("0").rstrip(".") if "." in text else text
            sizes.append(f"{text}{unit}")
        return min(sizes, key=len)


Budget = Annotated[
    KVBudget, BeforeValidator(KVBudget.parse), PlainSerializer(lambda budget: budget.to_setting())
]


class KVCacheConfig(_Section):
    budget: Budget = KVBudget(kind="auto", value=0)
    reserved_memory_mb: NonNegativeInt = 2048
    max_sequence_length: SequenceLength | None = None  # None: the model's own context
    block_size: BlockSize = 16
    disk_dir: ExpandedPath | None = None
    disk_max_gb: PositiveFloat = 10.0
    disk_write: Literal["evicted", "all"] = "evicted"
    bits: Literal[4, 8] | None = None


class KVCacheOverrides(_Section):
    """Per-model `[models.NAME.kv_cache]`: unset keys inherit from `[kv_cache]`."""

    budget: Budget | None = None
    reserved_memory_mb: NonNegativeInt | None = None
    max_sequence_length: SequenceLength | None = None
    block_size: BlockSize | None = None
    disk_dir: ExpandedPath | None = None
    disk_max_gb: PositiveFloat | None = None
    disk_write: Literal["evicted", "all"] | None = None
    bits: Literal[4, 8] | None = None


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: Port = 8100
    api_keys: list[ApiKey] = []
    cors_origins: list[str] = []
    allowed_hosts: list[AllowedHost] = []
    request_timeout_s: PositiveFloat = 600.0
    max_request_bytes: PositiveInt = 8 * 2**20
    shutdown_grace_s: PositiveFloat = 30.0
    header_timeout_s: PositiveFloat = 10.0
    body_timeout_s: PositiveFloat = 60.0
    max_connections: PositiveInt | None = None


MAX_MODEL_PATTERNS = 64
_MODEL_PATTERN = re.compile(r"[A-Za-z0-9._:/*?\[\]!-]{1,256}")


def _check_model_patterns(patterns: dict[str, str]) -> dict[str, str]:
    if len(patterns) > MAX_MODEL_PATTERNS:
        raise ValueError(f"has {len(patterns)} patterns; at most {MAX_MODEL_PATTERNS} are allowed")
    for pattern in patterns:
        if not _MODEL_PATTERN.fullmatch(pattern):
            raise ValueError(
                f"pattern {_show(pattern)}: a glob of at most 256 letters, digits, '.', '_', "
                "':', '/', '-' and the wildcards '*', '?' and '[...]'"
            )
    return patterns


class RegistryConfig(_Section):
    default_model: str = "demo"
    cache_dir: ExpandedPath = Field(default=Path("~/.cache/mlxserve"), validate_default=True)
    max_loaded_models: PositiveInt = 1
    # glob -> model name or alias: what an unknown model name matching the glob is served by
    model_patterns: Annotated[dict[str, str], AfterValidator(_check_model_patterns)] = {}


class SpeculativeConfig(_Section):
    """`[models.NAME.speculative]`: how the model drafts tokens it then verifies in one step."""

    method: Literal["ngram", "draft", "mtp"]
    num_draft_tokens: Annotated[Int, _bounds(1, 16)] = 4
    draft_model: str | None = None  # method "draft": a model name or alias from [models]
    ngram_min: Annotated[Int, _bounds(1, 16)] = 2
    ngram_max: Annotated[Int, _bounds(1, 16)] = 4
    adaptive: bool = True

    @model_validator(mode="after")
    def _check_method(self) -> SpeculativeConfig:
        if self.method == "draft" and self.draft_model is None:
            raise ValueError("method 'draft' needs draft_model (a model name from [models])")
        if self.method != "draft" and self.draft_model is not None:
            raise ValueError(f"draft_model is for method 'draft' (method is {self.method!r})")
        if self.ngram_min > self.ngram_max:
            raise ValueError(
                f"ngram_min ({self.ngram_min}) must be at most ngram_max ({self.ngram_max})"
            )
        return self


class ModelEntry(_Section):
    """One `[models.NAME]` table: where a model comes from and its default sampling settings."""

    source: str
    family: str | None = None
    aliases: list[str] = []
    revision: str | None = None
    max_tokens: PositiveInt | None = None
    temperature: Annotated[Float, _bounds(0)] | None = None
    top_p: Annotated[Float, _bounds(high=1, above=0)] | None = None
    top_k: NonNegativeInt | None = None
    min_p: Annotated[Float, _bounds(0, 1)] | None = None
    repetition_penalty: PositiveFloat | None = None
    kv_cache: KVCacheOverrides | None = None
    speculative: SpeculativeConfig | None = None
    check_exactness: bool = True

    @property
    def sampling_defaults(self) -> dict[str, float]:
        """The sampling settings this entry sets (below a request's, above its family's)."""
        values = {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
        }
        return {name: value for name, value in values.items() if value is not None}

    @property
    def source_kind(self) -> Literal["builtin", "local", "hub"]:
        """Where the weights come from: ``builtin:NAME``, a local path, or the Hugging Face Hub."""
        return source_kind(self.source)

    @field_validator("source")
    @classmethod
    def _check_source(cls, source: str) -> str:
        if source.startswith("builtin:"):
            if not source.removeprefix("builtin:").strip():
                raise ValueError(f"needs a model name after 'builtin:' (got {_show(source)})")
        elif not source.startswith(_LOCAL_PREFIXES) and not _HUB_ID.fullmatch(source):
            raise ValueError(
                "must be a Hugging Face repo id like 'org/repo', a local path starting with "
                f"'/', './', '../' or '~', or 'builtin:NAME' (got {_show(source)})"
            )
        return source


def source_kind(source: str) -> Literal["builtin", "local", "hub"]:
    """``builtin:NAME``, a local path, or a Hugging Face repo id."""
    if source.startswith("builtin:"):
        return "builtin"
    return "local" if source.startswith(_LOCAL_PREFIXES) else "hub"


class PerformanceConfig(_Section):
    max_batch_size: PositiveInt = 8
    prefill_step_size: PositiveInt = 512
    queue_size: PositiveInt = 64
    compute_dtype: Literal["auto", "float32", "model"] = "auto"


def _rdma_entry_ok(entry: Any) -> bool:
    if isinstance(entry, str):
        return entry == "" or bool(_RDMA_DEVICE.fullmatch(entry))
    return isinstance(entry, list) and all(
        isinstance(name, str) and _RDMA_DEVICE.fullmatch(name) for name in entry
    )


class DistributedConfig(_Section):
    backend: Literal["ring", "jaccl", "jaccl-ring", "mpi"] = "ring"
    hosts: list[str] = []
    hostfile: ExpandedPath | None = None
    rdma_devices: list[list[str | list[str]]] = []
    strategy: Literal["pipeline", "tensor", "auto"] = "auto"
    split: Literal["even", "memory"] | list[int] = "even"
    step_timeout_s: PositiveFloat = 30.0
    memory_limit_mb: list[PositiveInt] = []
    ssh_user: str | None = None
    python: str | None = None
    workdir: str | None = None
    starting_port: Annotated[Int, _bounds(1024, 65535)] = 32323

    @field_validator("split", mode="before")
    @classmethod
    def _check_split(cls, split: Any) -> Any:
        if split in ("even", "memory"):
            return split
        if (
            isinstance(split, list)
            and split
            and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in split)
        ):
            return split
        raise ValueError(
            f"must be 'even', 'memory' or a list of positive integers (got {_show(split)})"
        )

    @field_validator("rdma_devices", mode="before")
    @classmethod
    def _check_rdma_devices(cls, devices: Any) -> Any:
        if isinstance(devices, list) and all(
            isinstance(row, list) and all(_rdma_entry_ok(entry) for entry in row) for row in devices
        ):
            return devices
        raise ValueError(
            "must be one list per host, each with an entry per host: an RDMA device name "
            "such as 'rdma_en3', a list of them, or '' (the host itself, or no link) "
            f"(got {_show(devices)})"
        )


class PluginsConfig(_Section):
    enabled: list[str] | None = None
    trace: bool = False


class StructuredConfig(_Section):
    open_tool_schemas: bool = False


class LoggingConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    file: ExpandedPath | None = None

    @field_validator("level", mode="before")
    @classmethod
    def _lower_level(cls, level: Any) -> Any:
        return level.lower() if isinstance(level, str) else level


def _default_models() -> dict[str, ModelEntry]:
    return {name: ModelEntry(source=source) for name, source in _DEFAULT_MODEL_SOURCES.items()}


def _kv_conflicts(kv: KVCacheConfig) -> list[tuple[str, str]]:
    if kv.max_sequence_length is None:  # the model's context, bounded by the budget at load
        return []
    limit = f"max_sequence_length ({kv.max_sequence_length})"
    conflicts = []
    if kv.budget.kind == "tokens" and kv.budget.value < kv.max_sequence_length:
        why = "a full-length request could never fit"
        conflicts.append(("budget", f"{kv.budget.value} tokens is less than {limit}; {why}"))
    if kv.block_size > kv.max_sequence_length:
        conflicts.append(("block_size", f"{kv.block_size} is larger than {limit}"))
    return conflicts


def _rdma_conflicts(dist: DistributedConfig) -> list[tuple[Loc, str]]:
    """What is wrong with ``rdma_devices`` given the backend, the hosts and the hostfile."""
    devices, hosts, backend = dist.rdma_devices, dist.hosts, dist.backend
    where: Loc = ("rdma_devices",)
    if backend not in JACCL_BACKENDS:
        if devices:
            return [
                (where, f"is only for backend 'jaccl' or 'jaccl-ring' (backend is {backend!r})")
            ]
        return []
    if devices and dist.hostfile is not None:
        return [(where, "give the RDMA devices here or in distributed.hostfile, not both")]
    if not devices:
        if len(hosts) < 2 or dist.hostfile is not None:
            return []
        return [
            (
                where,
                f"backend {backend!r} needs each host's RDMA devices (a list per host, see "
                "docs/distributed.md), or a distributed.hostfile written by "
                "mlx.distributed_config",
            )
        ]
    if len(devices) != len(hosts):
        message = f"has {len(devices)} entries for {len(hosts)} distributed.hosts"
        return [(where, f"{message}; give one per host")]
    names = [[rdma_names(entry) for entry in row] for row in devices]
    return [
        ((*where, *at), message) for at, message in rdma_problems(names, backend == "jaccl-ring")
    ]


class Config(_Section):
    """The whole configuration; every section has defaults, so ``Config()`` is valid."""

    server: ServerConfig = Field(default_factory=ServerConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    models: dict[str, ModelEntry] = Field(default_factory=_default_models)
    kv_cache: KVCacheConfig = Field(default_factory=KVCacheConfig)
    performance: PerformanceConfig = Field(default_factory=PerformanceConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    plugins: PluginsConfig = Field(default_factory=PluginsConfig)
    structured: StructuredConfig = Field(default_factory=StructuredConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    def resolve_model(self, name: str | None = None) -> tuple[str, ModelEntry]:
        """The one resolver of model names: ``(canonical name, entry)`` of a model name or
        alias (None or "": ``[registry] default_model``), else of the model the first
        ``[registry] model_patterns`` glob it matches maps it to.

        Raises:
            ModelNotFoundError: no model has that name or alias, and no pattern matches it.
        """
        wanted = name or self.registry.default_model
        found = self._find_model(wanted)
        if found is None:
            found = self._find_by_pattern(wanted)
        if found is None:
            known = ", ".join(sorted(self.models)) or "none"
            raise ModelNotFoundError(f"model {wanted!r} does not exist (available: {known})")
        return found

    def _find_model(self, name: str) -> tuple[str, ModelEntry] | None:
        if name in self.models:
            return name, self.models[name]
        for model_name, entry in self.models.items():
            if name in entry.aliases:
                return model_name, entry
        return None

    def _find_by_pattern(self, name: str) -> tuple[str, ModelEntry] | None:
        for pattern, target in self.registry.model_patterns.items():
            if fnmatch.fnmatchcase(name, pattern):
                return self._find_model(target)
        return None

    def kv_cache_for(self, name: str) -> KVCacheConfig:
        """Effective KV-cache settings of a model (name or alias): `[kv_cache]` + its overrides.

        Raises:
            ModelNotFoundError: no model has that name or alias.
        """
        overrides = self.resolve_model(name)[1].kv_cache
        if overrides is None:
            return self.kv_cache
        return self.kv_cache.model_copy(update={k: v for k, v in overrides if v is not None})

    @model_validator(mode="after")
    def _check_cross_fields(self) -> Config:
        problems: list[tuple[Loc, str]] = []
        if self._find_model(self.registry.default_model) is None:
            known = ", ".join(repr(name) for name in self.models) or "none"
            message = f"{_show(self.registry.default_model)} is not a model name or alias"
            problems.append((("registry", "default_model"), f"{message} (models: {known})"))
        for pattern, target in self.registry.model_patterns.items():
            if self._find_model(target) is None:
                known = ", ".join(repr(name) for name in self.models) or "none"
                message = f"{_show(target)} is not a model name or alias (models: {known})"
                problems.append((("registry", "model_patterns", pattern), message))
        for name, entry in self.models.items():
            if not valid_model_name(name):
                problems.append((("models", name), f"a model name must be {_MODEL_NAME_RULE}"))
            for alias in entry.aliases:
                if not valid_alias(alias):
                    rule = f"{_MODEL_NAME_RULE}; '/' may join such parts"
                    problems.append((("models", name, "aliases"), f"alias {alias!r}: {rule}"))
        alias_owners: dict[str, str] = {}
        for name, entry in self.models.items():
            for alias in entry.aliases:
                if alias in self.models:
                    clash = f"the model name {alias!r}"
                elif alias in alias_owners:
                    clash = f"an alias of model {alias_owners[alias]!r}"
                else:
                    alias_owners[alias] = name
                    continue
                message = f"alias {alias!r} is already {clash}"
                problems.append((("models", name, "aliases"), message))
        for name, entry in self.models.items():
            spec = entry.speculative
            if spec is None or spec.draft_model is None:
                continue
            draft = self._find_model(spec.draft_model)
            where = ("models", name, "speculative", "draft_model")
            if draft is None:
                known = ", ".join(repr(n) for n in self.models)
                message = f"{_show(spec.draft_model)} is not a model name or alias"
                problems.append((where, f"{message} (models: {known})"))
            elif draft[0] == name:
                problems.append((where, "a model cannot be its own draft model"))
            elif draft[1].speculative is not None:
                problems.append((where, f"draft model {draft[0]!r} must not speculate itself"))
        split, hosts = self.distributed.split, self.distributed.hosts
        if isinstance(split, list) and hosts and len(split) != len(hosts):
            message = f"has {len(split)} entries for {len(hosts)} distributed.hosts"
            problems.append((("distributed", "split"), f"{message}; give one per host"))
        limits = self.distributed.memory_limit_mb
        if limits and len(limits) != len(hosts):
            message = f"has {len(limits)} entries for {len(hosts)} distributed.hosts"
            problems.append((("distributed", "memory_limit_mb"), f"{message}; give one per host"))
        problems += [(("distributed", *loc), msg) for loc, msg in _rdma_conflicts(self.distributed)]
        problems += [(("kv_cache", key), msg) for key, msg in _kv_conflicts(self.kv_cache)]
        for name, entry in self.models.items():
            overridden = {key for key, value in entry.kv_cache or () if value is not None}
            for key, message in _kv_conflicts(self.kv_cache_for(name)):
                involved = [k for k in (key, "max_sequence_length") if k in overridden]
                if involved:  # otherwise the global [kv_cache] check already reported it
                    problems.append((("models", name, "kv_cache", involved[0]), message))
        if problems:
            raise _CrossFieldError(problems)
        return self


# --- loading -----------------------------------------------------------------------------------


def _unwrap_optional(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, UnionType):
        args = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _model_at(path: Loc) -> type[BaseModel] | None:
    model: type[BaseModel] = Config
    keys = iter(part for part in path if isinstance(part, str))
    for key in keys:
        field = model.model_fields.get(key)
        if field is None:
            return None
        inner = _unwrap_optional(field.annotation)
        if get_origin(inner) is dict:
            if next(keys, None) is None:
                return None
            inner = get_args(inner)[1]
        if not (isinstance(inner, type) and issubclass(inner, BaseModel)):
            return None
        model = inner
    return model


def _wants_string(path: tuple[str, ...]) -> bool:
    model = _model_at(path[:-1])
    field = model.model_fields.get(path[-1]) if model else None
    return field is not None and _unwrap_optional(field.annotation) is str


def _table_at(data: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    for key in path:
        child = data.get(key)
        if not isinstance(child, dict):
            child = data[key] = {}
        data = child
    return data


def _merge(
    data: dict[str, Any],
    sources: dict[tuple[str, ...], str],
    path: tuple[str, ...],
    value: Any,
    source: str,
) -> None:
    """Deep-merge `value` at `path`, remembering which source set each leaf."""
    if isinstance(value, Mapping):
        _table_at(data, path)
        if not value:
            sources[path] = source
        for key, item in value.items():
            _merge(data, sources, (*path, str(key)), item, source)
        return
    _table_at(data, path[:-1])[path[-1]] = value
    for stale in [known for known in sources if known[: len(path)] == path]:
        del sources[stale]
    sources[path] = source


def _source_of(loc: Loc, sources: dict[tuple[str, ...], str], fallback: str) -> str:
    path = tuple(part for part in loc if isinstance(part, str))
    for end in range(len(path), 0, -1):
        if path[:end] in sources:
            return sources[path[:end]]
        inside = [source for known, source in sources.items() if known[:end] == path[:end]]
        if inside:  # e.g. a missing key: blame whoever wrote the rest of its table
            return inside[0]
    return fallback


def _parse_env_value(raw: str, path: tuple[str, ...]) -> Any:
    try:
        parsed = tomllib.loads(f"value = {raw}")
    except tomllib.TOMLDecodeError:
        return raw
    value = parsed.get("value")
    if len(parsed) != 1 or not isinstance(value, (str, bool, int, float, list, dict)):
        return raw
    return raw if _wants_string(path) and not isinstance(value, str) else value


def _env_entries(
    env: Mapping[str, str], data: dict[str, Any]
) -> list[tuple[tuple[str, ...], Any, str]]:
    entries: list[tuple[tuple[str, ...], Any, str]] = []
    for var, raw in sorted(env.items()):
        if var == PLUGINS_ENV_VAR:
            names = [name.strip() for name in raw.split(",") if name.strip()]
            if names:
                entries.append((("plugins", "enabled"), names, var))
            continue
        rest = var.removeprefix(ENV_PREFIX)
        if rest == var or var == CONFIG_ENV_VAR or "__" not in rest:
            continue
        path = tuple(rest.lower().split("__"))
        if not all(path):
            raise ConfigError(f"{var}: malformed name (expected MLXSERVE_<SECTION>__<KEY>)")
        models = data.get("models")
        if path[0] == "models" and isinstance(models, dict) and path[1] not in models:
            # Env names cannot contain '-' or '.', so MODELS__QWEN3_0_6B matches "qwen3-0.6b".
            similar = [n for n in models if re.sub(r"[^a-z0-9]", "_", n.lower()) == path[1]]
            if len(similar) == 1:
                path = (path[0], similar[0], *path[2:])
        entries.append((path, _parse_env_value(raw, path), var))
    return entries


def _describe(error: ErrorDetails) -> str:
    kind, loc, ctx = error["type"], error["loc"], error.get("ctx") or {}
    got = _show(error.get("input"))
    if kind == "extra_forbidden":
        model = _model_at(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields) if model else [])
        what = "unknown section" if len(loc) == 1 else "unknown key"
        return f"{what} (did you mean {close[0]!r}?)" if close else what
    if kind == "missing":
        return "required key is missing"
    if kind in ("value_error", "assertion_error"):
        return str(ctx["error"])
    if kind == "literal_error":
        return f"must be one of {', '.join(ctx['expected'].rsplit(' or ', 1))} (got {got})"
    expected = {
        "int_type": "an integer",
        "int_parsing": "an integer",
        "int_from_float": "an integer",
        "float_type": "a number",
        "float_parsing": "a number",
        "bool_type": "true or false",
        "bool_parsing": "true or false",
        "string_type": "a string",
        "list_type": "a list",
        "dict_type": "a table",
        "model_type": "a table",
        "model_attributes_type": "a table",
        "path_type": "a path",
    }.get(kind)
    if expected:
        return f"must be {expected} (got {got})"
    return f"{error['msg'][:1].lower()}{error['msg'][1:]} (got {got})"


def _problems(
    exc: ValidationError, sources: dict[tuple[str, ...], str], fallback: str
) -> list[str]:
    lines: list[str] = []
    for error in exc.errors():
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, _CrossFieldError):
            found = [((*error["loc"], *loc), message) for loc, message in cause.problems]
        else:
            found = [(error["loc"], _describe(error))]
        for loc, message in found:
            where = f"{_dotted(loc)}: " if loc else ""
            line = f"{_source_of(loc, sources, fallback)}: {where}{message}"
            if line not in lines:
                lines.append(line)
    return lines


def _read_toml(file: Path, label: str) -> dict[str, Any]:
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{label}: no such file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{label}: not valid UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{label}: cannot read ({exc.strerror})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        at = re.fullmatch(r"(?s)(.*?) \(at line (\d+), column (\d+)\)", message)
        if at:
            reason = at[1][:1].lower() + at[1][1:]
            message = f"invalid TOML at line {at[2]}, column {at[3]}: {reason}"
        else:
            message = f"invalid TOML: {message}"
        raise ConfigError(f"{label}: {message}") from None


def load_config(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Load the effective configuration.

    Precedence: `overrides` > environment (``MLXSERVE_<SECTION>__<KEY>``, ``MLXSERVE_PLUGINS``)
    > TOML file > defaults. Without `path`, ``$MLXSERVE_CONFIG`` or ``./mlxserve.toml`` is used
    if present, else only defaults.

    Args:
        path: TOML file to read; it must exist.
        env: Environment to read (default ``os.environ``).
        overrides: Dotted keys from the command line, e.g. ``{"server.port": 9000}``;
            None values are skipped (flags that were not given).

    Raises:
        ConfigError: listing every problem, each prefixed with where the value came from.
    """
    env = os.environ if env is None else env
    if path is None and env.get(CONFIG_ENV_VAR):
        path = env[CONFIG_ENV_VAR]
    elif path is None and Path(DEFAULT_CONFIG_FILE).is_file():
        path = DEFAULT_CONFIG_FILE
    data: dict[str, Any] = {}
    sources: dict[tuple[str, ...], str] = {}
    fallback = "defaults"
    if path is not None:
        fallback = os.fspath(path)
        _merge(data, sources, (), _read_toml(Path(path), fallback), fallback)
    if "models" not in data:
        data["models"] = {name: {"source": src} for name, src in _DEFAULT_MODEL_SOURCES.items()}
    for key_path, value, var in _env_entries(env, data):
        _merge(data, sources, key_path, value, var)
    for key, value in (overrides or {}).items():
        key_path = tuple(key.split("."))
        if not all(key_path):
            raise ConfigError(f"{CLI_SOURCE}: {key!r}: malformed key")
        if value is not None:
            _merge(data, sources, key_path, value, CLI_SOURCE)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_problems(exc, sources, fallback)) from None


# --- dumping -----------------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _emit_table(table: Mapping[str, Any], path: tuple[str, ...], lines: list[str]) -> None:
    scalars = {key: value for key, value in table.items() if not isinstance(value, dict)}
    tables = {key: value for key, value in table.items() if isinstance(value, dict)}
    if path and (scalars or not tables):
        lines += ["", f"[{_dotted(path)}]"]
    lines += [f"{_dotted((key,))} = {_toml_value(value)}" for key, value in scalars.items()]
    for key, value in tables.items():
        _emit_table(value, (*path, key), lines)


def dump_config(config: Config, *, mask_secrets: bool = True) -> str:
    """Render the effective configuration as TOML that `load_config` reads back unchanged.

    Args:
        config: The configuration to render; None values are omitted.
        mask_secrets: Replace each API key with ``"***"``.
    """
    data = config.model_dump(exclude_none=True)
    if mask_secrets:
        data["server"]["api_keys"] = ["***"] * len(config.server.api_keys)
    lines: list[str] = []
    _emit_table(data, (), lines)
    return "\n".join(lines).strip() + "\n"
