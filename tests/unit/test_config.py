from __future__ import annotations

import re
from pathlib import Path

import pytest

from mlxserve.core.config.schema import (
    Config,
    ConfigError,
    KVBudget,
    KVCacheConfig,
    ModelEntry,
    dump_config,
    load_config,
)
from mlxserve.core.errors import ModelNotFoundError

from ..support import REPO

SHIPPED = REPO / "mlxserve.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mlxserve.toml"
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str, **kwargs: object) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), **{"env": {}, **kwargs})
    return str(info.value)


def test_defaults() -> None:
    config = Config()
    assert config.server.port == 8100
    assert config.server.host == "127.0.0.1"
    assert config.registry.cache_dir == Path("~/.cache/mlxserve").expanduser()
    assert config.kv_cache.budget == KVBudget(kind="auto", value=0)
    assert config.models == {"demo": ModelEntry(source="builtin:smollm2-135m-instruct")}
    assert config.plugins.enabled is None
    assert config.resolve_model("demo") == ("demo", config.models["demo"])


def test_no_file_gives_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_config(env={}) == Config()


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, ""), env={}) == Config()


def test_shipped_file_equals_defaults() -> None:
    assert load_config(SHIPPED, env={}) == Config()


def test_shipped_file_documents_every_key() -> None:
    text = SHIPPED.read_text()
    sections = {name: field.annotation for name, field in Config.model_fields.items()}
    sections["models.demo"] = ModelEntry
    for section, model in sections.items():
        if section == "models":
            continue
        assert f"[{section}]" in text
        for key in model.model_fields:
            if key == "speculative":  # a table of its own, shown commented out
                assert f"# [{section}.{key}]" in text
            elif key != "kv_cache":
                assert re.search(rf"^(# )?{key} = .*", text, re.MULTILINE), f"{section}.{key}"


def test_config_env_var_and_cwd_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit = tmp_path / "other.toml"
    explicit.write_text("[server]\nport = 9001\n")
    assert load_config(env={"MLXSERVE_CONFIG": str(explicit)}).server.port == 9001
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "[server]\nport = 9002\n")
    assert load_config(env={}).server.port == 9002


def test_missing_explicit_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^.*nope\.toml: no such file$"):
        load_config(tmp_path / "nope.toml", env={})


def test_env_override() -> None:
    config = load_config(
        env={
            "MLXSERVE_SERVER__PORT": "9000",
            "MLXSERVE_SERVER__HOST": "0.0.0.0",
            "MLXSERVE_SERVER__API_KEYS": '["a", "b"]',
            "MLXSERVE_PLUGINS__TRACE": "true",
            "MLXSERVE_MODELS__DEMO__REVISION": "1234567",
            "MLXSERVE_KV_CACHE__BUDGET": "2GB",
            "MLXSERVE_UNRELATED": "ignored",
        }
    )
    assert config.server.port == 9000
    assert config.server.host == "0.0.0.0"
    assert config.server.api_keys == ["a", "b"]
    assert config.plugins.trace is True
    assert config.models["demo"].revision == "1234567"  # digits stay a string for str keys
    assert config.kv_cache.budget == KVBudget(kind="bytes", value=2 * 2**30)


def test_env_model_name_with_dashes(tmp_path: Path) -> None:
    path = write(
        tmp_path, '[models."qwen3-0.6b"]\nsource = "a/b"\n[registry]\ndefault_model = "qwen3-0.6b"'
    )
    config = load_config(path, env={"MLXSERVE_MODELS__QWEN3_0_6B__TEMPERATURE": "0.5"})
    assert config.models["qwen3-0.6b"].temperature == 0.5


def test_precedence_overrides_then_env_then_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nport = 8001\nhost = "file"\ncors_origins = ["x"]\n')
    env = {"MLXSERVE_SERVER__PORT": "8002", "MLXSERVE_SERVER__HOST": "env"}
    config = load_config(path, env=env, overrides={"server.port": 8003, "server.host": None})
    assert config.server.port == 8003
    assert config.server.host == "env"
    assert config.server.cors_origins == ["x"]
    assert config.server.request_timeout_s == 600.0


def test_plugins_env_var() -> None:
    config = load_config(env={"MLXSERVE_PLUGINS": "llama, qwen,,"})
    assert config.plugins.enabled == ["llama", "qwen"]
    assert load_config(env={"MLXSERVE_PLUGINS": ""}).plugins.enabled is None


RDMA = "rdma_devices = [['', 'rdma_en3'], ['rdma_en3', '']]"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[server]\nport = 99999", "server.port: must be between 1 and 65535 (got 99999)"),
        ("[server]\nport = 'abc'", "server.port: must be an integer (got 'abc')"),
        ("[server]\nport = true", "server.port: must be an integer (got true)"),
        ("[server]\nhost = 1", "server.host: must be a string (got 1)"),
        ("[server]\nrequest_timeout_s = 0", "server.request_timeout_s: must be greater than 0"),
        (
            "[distributed]\nstrategy = 'ring'",
            "distributed.strategy: must be one of 'pipeline', 'tensor', 'auto' (got 'ring')",
        ),
        ("[server]\nprot = 1", "server.prot: unknown key (did you mean 'port'?)"),
        ("[server]\nzzz = 1", "server.zzz: unknown key"),
        ("[sever]\nport = 1", "sever: unknown section (did you mean 'server'?)"),
        (
            "[registry]\ndefault_model = 'nope'",
            "registry.default_model: 'nope' is not a model name or alias (models: 'demo')",
        ),
        (
            "[models.a]\nsource = 'o/a'\naliases = ['x']\n[models.b]\nsource = 'o/b'\n"
            "aliases = ['x']\n[registry]\ndefault_model = 'a'",
            "models.b.aliases: alias 'x' is already an alias of model 'a'",
        ),
        (
            "[models.a]\nsource = 'o/a'\naliases = ['b']\n[models.b]\nsource = 'o/b'\n"
            "[registry]\ndefault_model = 'a'",
            "models.a.aliases: alias 'b' is already the model name 'b'",
        ),
        (
            "[distributed]\nhosts = ['h1', 'h2']\nsplit = [1]",
            "distributed.split: has 1 entries for 2 distributed.hosts; give one per host",
        ),
        ("[distributed]\nsplit = 'odd'", "distributed.split: must be 'even', 'memory' or a list"),
        (
            "[distributed]\nbackend = 'any'",
            "distributed.backend: must be one of 'ring', 'jaccl', 'jaccl-ring', 'mpi' (got 'any')",
        ),
        (
            "[distributed]\nbackend = 'jaccl'\nhosts = ['a', 'b']",
            "distributed.rdma_devices: backend 'jaccl' needs each host's RDMA devices",
        ),
        (
            "[distributed]\nbackend = 'jaccl'\nhosts = ['a', 'b']\nrdma_devices = [['', 'x']]",
            "distributed.rdma_devices: has 1 entries for 2 distributed.hosts; give one per host",
        ),
        (
            f"[distributed]\nbackend = 'jaccl'\nhosts = ['a', 'b']\n{RDMA}"
            "\nhostfile = 'hosts.json'",
            "distributed.rdma_devices: give the RDMA devices here or in distributed.hostfile",
        ),
        (
            "[distributed]\nbackend = 'jaccl'\nhosts = ['a', 'b']\n"
            "rdma_devices = [['', 'x'], ['x']]",
            "distributed.rdma_devices[1]: has 1 entries for 2 hosts: one per host, none for the",
        ),
        (
            "[distributed]\nbackend = 'jaccl'\nhosts = ['a', 'b']\n"
            "rdma_devices = [['x', 'x'], ['x', '']]",
            "distributed.rdma_devices[0][0]: a host has no RDMA device to itself: leave it empty",
        ),
        (
            "[distributed]\nbackend = 'jaccl'\nhosts = ['a', 'b', 'c']\n"
            "rdma_devices = [['', 'x', 'z'], ['x', '', 'y'], ['', 'y', '']]",
            "distributed.rdma_devices[2][0]: no RDMA device from host 2 to host 0: jaccl needs",
        ),
        (
            "[distributed]\nbackend = 'jaccl'\nrdma_devices = [['', 'en 3']]",
            "distributed.rdma_devices: must be one list per host, each with an entry per host",
        ),
        (
            f"[distributed]\nhosts = ['a', 'b']\n{RDMA}",
            "distributed.rdma_devices: is only for backend 'jaccl' or 'jaccl-ring' (backend is "
            "'ring')",
        ),
        (
            "[kv_cache]\nbudget = 1024\nmax_sequence_length = 4096",
            "kv_cache.budget: 1024 tokens is less than max_sequence_length (4096)",
        ),
        (
            "[kv_cache]\nbudget = '2 parsecs'",
            "kv_cache.budget: must be 'auto', a token count, or a size like '512MB' or '2GB' "
            "(got '2 parsecs')",
        ),
        (
            "[kv_cache]\nblock_size = 24",
            "kv_cache.block_size: must be a power of two between 1 and 1024 (got 24)",
        ),
        (
            "[kv_cache]\nblock_size = 64\nmax_sequence_length = 32",
            "kv_cache.block_size: 64 is larger than max_sequence_length (32)",
        ),
        ("[kv_cache]\nbits = 16", "kv_cache.bits: must be one of 4, 8 (got 16)"),
        ("[models.demo]\nsource = 'nope'", "models.demo.source: must be a Hugging Face repo id"),
        ("[models.demo]\nsource = 'builtin:'", "models.demo.source: needs a model name"),
        ("[models.demo]\ntop_p = 0.5", "models.demo.source: required key is missing"),
        (
            "[models.demo]\nsource = 'a/b'\ntop_p = 0",
            "models.demo.top_p: must be greater than 0 and at most 1 (got 0.0)",
        ),
        (
            "[models.demo]\nsource = 'a/b'\n[models.demo.kv_cache]\nmax_sequence_length = 8",
            "models.demo.kv_cache.max_sequence_length: must be at least 16 (got 8)",
        ),
        (
            "[kv_cache]\nbudget = 4096\n[models.demo]\nsource = 'a/b'\n"
            "[models.demo.kv_cache]\nmax_sequence_length = 8192",
            "models.demo.kv_cache.max_sequence_length: 4096 tokens is less than",
        ),
        ("[logging]\nlevel = 'loud'", "logging.level: must be one of 'debug', 'info'"),
        (
            "[models.'../../x']\nsource = 'a/b'\n[registry]\ndefault_model = '../../x'",
            'models."../../x": a model name must be at most 128 letters, digits',
        ),
        (
            "[models.'a/b']\nsource = 'a/b'\n[registry]\ndefault_model = 'a/b'",
            'models."a/b": a model name must be',
        ),
        ("[models.'x..y']\nsource = 'a/b'\n[registry]\ndefault_model = 'x..y'", "models"),
        (
            "[models.demo]\nsource = 'a/b'\naliases = ['../up']",
            "models.demo.aliases: alias '../up': at most 128 letters",
        ),
        (
            "[server]\napi_keys = ['ok', 'sk-\u00e9t\u00e9']",
            "server.api_keys[1]: an API key must be non-empty printable ASCII without spaces",
        ),
        ("[server]\napi_keys = ['two words']", "server.api_keys[0]: an API key must be"),
        ("[server]\nmax_request_bytes = 0", "server.max_request_bytes: must be at least 1"),
        ("[server]\nshutdown_grace_s = 0", "server.shutdown_grace_s: must be greater than 0"),
        (
            "[registry.model_patterns]\n'claude-*' = 'nope'",
            "registry.model_patterns.\"claude-*\": 'nope' is not a model name or alias "
            "(models: 'demo')",
        ),
        (
            "[registry.model_patterns]\n'claude *' = 'demo'",
            "registry.model_patterns: pattern 'claude *': a glob of at most 256 letters",
        ),
        (
            "[registry.model_patterns]\n'claude-*' = 3",
            'registry.model_patterns."claude-*": must be a string (got 3)',
        ),
        ("[registry]\nmodel_patterns = ['x']", "registry.model_patterns: must be a table"),
    ],
)
def test_validation_messages(tmp_path: Path, text: str, expected: str) -> None:
    message = error_of(tmp_path, text)
    assert message.startswith(f"{tmp_path / 'mlxserve.toml'}: {expected}")
    assert "\n" not in message
    assert "pydantic" not in message
    assert "Traceback" not in message


def test_several_problems_one_line_each(tmp_path: Path) -> None:
    lines = error_of(tmp_path, "[server]\nport = 0\nhost = 1\n[sever]\n").splitlines()
    assert len(lines) == 3
    assert all(line.startswith(str(tmp_path / "mlxserve.toml") + ": ") for line in lines)


def test_broken_toml_reports_line_and_column(tmp_path: Path) -> None:
    message = error_of(tmp_path, "[server]\n\nport = = 3\n")
    assert re.fullmatch(r".*mlxserve\.toml: invalid TOML at line 3, column 8: \S.*", message)


def test_error_from_env_names_the_variable() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env={"MLXSERVE_SERVER__PORT": "99999"})
    assert str(info.value) == (
        "MLXSERVE_SERVER__PORT: server.port: must be between 1 and 65535 (got 99999)"
    )


def test_env_unknown_section_names_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"^MLXSERVE_SEVER__PORT: sever: unknown section"):
        load_config(env={"MLXSERVE_SEVER__PORT": "1"})


def test_env_malformed_name() -> None:
    with pytest.raises(ConfigError, match=r"^MLXSERVE_SERVER__: malformed name"):
        load_config(env={"MLXSERVE_SERVER__": "1"})


def test_error_from_overrides_says_command_line(tmp_path: Path) -> None:
    message = error_of(tmp_path, "[server]\nport = 1\n", overrides={"server.port": 0})
    assert message == "command line: server.port: must be between 1 and 65535 (got 0)"


@pytest.mark.parametrize(
    ("raw", "kind", "value", "setting"),
    [
        ("auto", "auto", 0, "auto"),
        ("AUTO", "auto", 0, "auto"),
        (4096, "tokens", 4096, 4096),
        ("4096", "tokens", 4096, 4096),
        ("512MB", "bytes", 512 * 2**20, "512MB"),
        ("512 mib", "bytes", 512 * 2**20, "512MB"),
        ("2GB", "bytes", 2 * 2**30, "2GB"),
        ("2GiB", "bytes", 2 * 2**30, "2GB"),
        ("1.5gb", "bytes", 3 * 2**29, "1.5GB"),
        ("0.3GB", "bytes", round(0.3 * 2**30), None),
    ],
)
def test_budget_forms(raw: object, kind: str, value: int, setting: object) -> None:
    budget = KVBudget.parse(raw)
    assert (budget.kind, budget.value) == (kind, value)
    if setting is not None:
        assert budget.to_setting() == setting
    assert KVBudget.parse(budget.to_setting()) == budget


@pytest.mark.parametrize("raw", [0, -5, 1.5, True, "", "0MB", "2TB", "fast", [1]])
def test_budget_rejects(raw: object) -> None:
    with pytest.raises(ValueError, match="must be"):
        KVBudget.parse(raw)


FULL = """
[server]
host = "0.0.0.0"
port = 9000
api_keys = ["sk-secret", "sk-other"]
cors_origins = ["http://localhost:3000"]
request_timeout_s = 12.5

[registry]
default_model = "qwen"
cache_dir = "/tmp/mlxserve-cache"
max_loaded_models = 2

[models.qwen3]
source = "mlx-community/Qwen3-0.6B-4bit"
family = "qwen"
aliases = ["qwen", "q"]
revision = "main"
max_tokens = 512
temperature = 0.6
top_p = 0.95
top_k = 20
min_p = 0.0
repetition_penalty = 1.1

[models.qwen3.kv_cache]
budget = "1.5GB"
bits = 4

[models."odd.name"]
source = "./weights/odd"

[models.demo]
source = "builtin:tiny-llama"

[kv_cache]
budget = 65536
max_sequence_length = 8192
block_size = 32
disk_dir = "/tmp/kv"
disk_max_gb = 2.5
disk_write = "all"
bits = 8

[performance]
max_batch_size = 4

[distributed]
hosts = ["a.local", "b.local"]
strategy = "pipeline"
split = [2, 1]
ssh_user = "me"
python = "/usr/bin/python3"
workdir = "/srv"
starting_port = 40000

[plugins]
enabled = ["llama", "qwen"]
trace = true

[logging]
level = "DEBUG"
file = "~/mlxserve.log"
"""


def test_dump_round_trips(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL), env={})
    dumped = dump_config(config, mask_secrets=False)
    again = load_config(write(tmp_path, dumped), env={})
    assert again == config
    assert dump_config(again, mask_secrets=False) == dumped
    assert 'budget = "1.5GB"' in dumped
    assert "budget = 65536" in dumped
    assert '[models."odd.name"]' in dumped


JACCL = """
[distributed]
backend = "jaccl-ring"
hosts = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]
rdma_devices = [
  ["", "rdma_en2", "", "rdma_en5"],
  ["rdma_en2", "", "rdma_en3", ""],
  ["", "rdma_en3", "", "rdma_en6"],
  ["rdma_en5", "", "rdma_en6", ""],
]
"""
TWO_CABLES = """
[distributed]
backend = "jaccl"
hosts = ["10.0.0.1", "10.0.0.2"]
rdma_devices = [["", ["rdma_en3", "rdma_en4"]], [["rdma_en3", "rdma_en4"], ""]]
"""


def test_rdma_devices_and_a_hostfile_round_trip(tmp_path: Path) -> None:
    """A ring of four Macs; two Macs with two cables; mlx.distributed_config's hostfile."""
    config = load_config(write(tmp_path, TWO_CABLES), env={})
    assert config.distributed.rdma_devices[1] == [["rdma_en3", "rdma_en4"], ""]
    hostfile = "[distributed]\nbackend = 'jaccl'\nhostfile = '~/hosts.json'\n"
    for text in (JACCL, TWO_CABLES, hostfile):
        config = load_config(write(tmp_path, text), env={})
        assert load_config(write(tmp_path, dump_config(config)), env={}) == config
    assert config.distributed.hostfile == Path("~/hosts.json").expanduser()


def test_dump_of_defaults_round_trips(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, dump_config(Config())), env={}) == Config()


def test_dump_masks_secrets(tmp_path: Path) -> None:
    dumped = dump_config(load_config(write(tmp_path, FULL), env={}))
    assert "sk-secret" not in dumped
    assert 'api_keys = ["***", "***"]' in dumped


def test_resolve_model_and_source_kind(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL), env={})
    assert config.resolve_model("q") == ("qwen3", config.models["qwen3"])
    assert config.resolve_model("qwen3") == ("qwen3", config.models["qwen3"])
    assert config.resolve_model(None) == config.resolve_model("") == config.resolve_model("qwen")
    available = "(available: demo, odd.name, qwen3)"
    with pytest.raises(
        ModelNotFoundError, match=re.escape(f"model 'missing' does not exist {available}")
    ):
        config.resolve_model("missing")
    assert config.models["qwen3"].source_kind == "hub"
    assert config.models["odd.name"].source_kind == "local"
    assert config.models["demo"].source_kind == "builtin"
    assert config.logging.level == "debug"
    assert config.logging.file == Path("~/mlxserve.log").expanduser()


def test_kv_cache_for_merges_overrides(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL), env={})
    qwen = config.kv_cache_for("qwen")
    assert isinstance(qwen, KVCacheConfig)
    assert qwen.budget == KVBudget(kind="bytes", value=3 * 2**29)
    assert (qwen.bits, qwen.block_size) == (4, 32)
    assert config.kv_cache_for("demo") == config.kv_cache


def test_models_are_frozen() -> None:
    config = Config()
    with pytest.raises(ValueError):
        config.server.port = 1  # type: ignore[misc]


def test_model_names_that_stay_valid(tmp_path: Path) -> None:
    names = ["demo", "llama", "qwen3-0.6b", "odd.name", "Mistral_7B:q4"]
    text = "".join(f'[models."{name}"]\nsource = "a/b"\n' for name in names)
    text += '[models.alias-owner]\nsource = "a/b"\naliases = ["mlx-community/Qwen3-0.6B-4bit"]\n'
    config = load_config(write(tmp_path, text + '[registry]\ndefault_model = "demo"'), env={})
    assert list(config.models) == [*names, "alias-owner"]


def test_a_rejected_api_key_is_never_shown(tmp_path: Path) -> None:
    message = error_of(tmp_path, "[server]\napi_keys = ['sk-s\u00e9cret']")
    assert "cret" not in message and "server.api_keys[0]" in message


def test_server_limits_defaults() -> None:
    server = Config().server
    assert server.max_request_bytes == 8 * 2**20
    assert server.shutdown_grace_s == 30.0


def test_model_patterns_map_unknown_names_to_a_model(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            "[models.demo]\nsource = 'org/demo'\n"
            "[models.qwen]\nsource = 'org/qwen'\naliases = ['claude-exact']\n"
            "[registry.model_patterns]\n'claude-opus-*' = 'demo'\n'claude-*' = 'claude-exact'\n",
        ),
        env={},
    )
    assert config.resolve_model("claude-opus-4-8")[0] == "demo"  # the first match wins
    assert config.resolve_model("claude-sonnet-5")[0] == "qwen"  # through an alias
    assert config.resolve_model("claude-exact")[0] == "qwen"  # names and aliases first
    assert config.kv_cache_for("claude-opus-4-8") == config.kv_cache
    with pytest.raises(ModelNotFoundError, match="'gpt-5' does not exist"):
        config.resolve_model("gpt-5")
    with pytest.raises(ModelNotFoundError):
        config.resolve_model("Claude-opus-4-8")  # globs are case-sensitive
    assert Config().registry.model_patterns == {}
    assert load_config(write(tmp_path, dump_config(config)), env={}) == config
