"""Plugin discovery, the allow-list, broken plugins, conflicts, and every hook."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlx_lm.models.cache import RotatingKVCache

from mlxserve.core.config.schema import load_config
from mlxserve.core.errors import UnknownModelTypeError
from mlxserve.core.kv.caches import KVCacheOptions
from mlxserve.core.model.exactness import ExactnessError
from mlxserve.core.model.layout import DecoderLayout
from mlxserve.plugins import ModelFamily, ReasoningFormat, ThinkTags, hookimpl, hookspecs
from mlxserve.plugins.families.llama import Llama
from mlxserve.plugins.tool_calls import HermesToolCalls, ToolCallFormat
from mlxserve.registry.models import ModelRegistry
from mlxserve.registry.plugins import load_plugins

from ..support import BUILTIN_FAMILIES
from ..support.plugins import write_broken_plugin

HOOK_NAMES = sorted(n for n in dir(hookspecs) if n.startswith("mlxserve_"))


def registry_for(tmp_path: Path, checkpoint: Path, *extra: tuple[str, object]) -> ModelRegistry:
    toml = tmp_path / "mlxserve.toml"
    toml.write_text(
        f'[registry]\ndefault_model = "tiny"\ncache_dir = "{tmp_path / "cache"}"\n'
        f'[models.tiny]\nsource = "{checkpoint}"\n'
    )
    return ModelRegistry(load_config(toml, env={}), load_plugins(extra=extra))


def test_builtins_are_found_through_the_entry_point_group() -> None:
    plugins = load_plugins()
    builtin = {e.family.name for e in plugins.families if e.plugin.builtin}
    assert builtin == {*BUILTIN_FAMILIES, "generic", "gpt_oss"}
    for entry in plugins.families:
        if entry.plugin.builtin:
            assert entry.plugin.package == "mlxserve"
            assert entry.plugin.module == f"mlxserve.plugins.families.{entry.family.name}"


def test_external_example_plugin_is_discovered() -> None:
    plugins = load_plugins()
    [gemma] = [e for e in plugins.families if e.family.name == "gemma"]
    assert gemma.plugin.package == "mlxserve-example-family"
    assert not gemma.plugin.builtin
    assert plugins.family_for("gemma") is gemma.family


def test_allow_list_loads_only_the_named_plugins(caplog: pytest.LogCaptureFixture) -> None:
    plugins = load_plugins(["llama", "gemma", "nonesuch"])
    assert sorted(e.family.name for e in plugins.families) == ["gemma", "llama"]
    with pytest.raises(UnknownModelTypeError, match="qwen3"):
        plugins.family_for("qwen3")
    assert "nonesuch" in caplog.text


def test_broken_plugin_is_reported_and_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.syspath_prepend(str(write_broken_plugin(tmp_path)))
    plugins = load_plugins()
    [broken] = [i for i in plugins.infos if i.name == "broken"]
    assert broken.error == "ImportError: needs the library frobnicate, which is not installed"
    assert broken.package == "broken-plugin"
    assert {e.family.name for e in plugins.families} >= set(BUILTIN_FAMILIES)
    assert "failed to load and is skipped" in caplog.text


class ThirdPartyLlama(Llama):
    name = "llama-plus"


class OtherLlama(Llama):
    name = "llama-other"


class ClaimLlama:
    def __init__(self, family: ModelFamily) -> None:
        self.family = family

    @hookimpl
    def mlxserve_families(self) -> list[ModelFamily]:
        return [self.family]


def test_third_party_family_wins_over_builtin() -> None:
    plugins = load_plugins(extra=[("plus", ClaimLlama(ThirdPartyLlama()))])
    assert plugins.family_for("llama").name == "llama-plus"


def test_two_third_party_claims_are_a_conflict() -> None:
    plugins = load_plugins(
        extra=[("plus", ClaimLlama(ThirdPartyLlama())), ("other", ClaimLlama(OtherLlama()))]
    )
    with pytest.raises(UnknownModelTypeError, match="llama-plus.*llama-other|llama-other.*plus"):
        plugins.family_for("llama")
    assert plugins.family("llama-other").name == "llama-other"


class Nameless(Llama):
    name = ""


class NoModelTypes(Llama):
    name = "no-types"
    model_types = ()


class StopTokenNotAString(Llama):
    name = "bad-stops"
    stop_tokens = ("<|eot_id|>", 7)  # type: ignore[assignment]


class UnknownDefault(Llama):
    name = "bad-defaults"
    sampling_defaults = {"temprature": 0.5}


class DefaultOutOfRange(Llama):
    name = "hot"
    sampling_defaults = {"temperature": 1000.0}


class ToolFormatNotAFormat(DefaultOutOfRange):
    sampling_defaults = {}
    tool_call_format = "hermes"


class ReasoningFormatNotAFormat(DefaultOutOfRange):
    sampling_defaults = {}
    reasoning_format = "<think>"


class GGUFArchitectureNotAString(Llama):
    name = "bad-gguf"
    gguf_architectures = ("llama", "")


class Broken:
    @hookimpl
    def mlxserve_families(self) -> list[ModelFamily]:
        raise RuntimeError("cannot list families")


@pytest.mark.parametrize(
    ("family", "problem"),
    [
        (Nameless(), "name must be a non-empty string"),
        (NoModelTypes(), "model_types must be a non-empty tuple"),
        (StopTokenNotAString(), "stop_tokens must be a tuple of non-empty strings"),
        (UnknownDefault(), "sampling_defaults has unknown keys temprature"),
        (DefaultOutOfRange(), "sampling_defaults temperature: must be between 0 and 100"),
        (ToolFormatNotAFormat(), "tool_call_format must be a ToolCallFormat or None"),
        (ReasoningFormatNotAFormat(), "reasoning_format must be a ReasoningFormat or None"),
        (GGUFArchitectureNotAString(), "gguf_architectures must be a tuple of non-empty strings"),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, ModelFamily) else "",
)
def test_an_invalid_family_is_reported_and_skipped(
    family: ModelFamily, problem: str, caplog: pytest.LogCaptureFixture
) -> None:
    plugins = load_plugins(extra=[("bad", ClaimLlama(family)), ("good", ClaimLlama(OtherLlama()))])
    assert family not in [e.family for e in plugins.families]
    assert plugins.family("llama-other").name == "llama-other"
    [info] = [i for i in plugins.infos if i.name == "bad"]
    assert problem in info.error and problem in caplog.text
    assert {e.family.name for e in plugins.families} >= set(BUILTIN_FAMILIES)


def test_a_plugin_whose_families_hook_raises_is_skipped() -> None:
    plugins = load_plugins(extra=[("broken-hook", Broken())])
    [info] = [i for i in plugins.infos if i.name == "broken-hook"]
    assert "RuntimeError: cannot list families" in info.error
    assert {e.family.name for e in plugins.families} >= set(BUILTIN_FAMILIES)


def test_eos_token_ids_add_the_family_stop_tokens_in_the_vocabulary(
    tmp_path: Path, tiny_checkpoints: dict[str, Path]
) -> None:
    class MoreStops(Llama):
        name = "llama-more-stops"
        stop_tokens = (*Llama.stop_tokens, "<|start_header_id|>", "<|not-in-vocab|>")

    plain = registry_for(tmp_path, tiny_checkpoints["llama"]).load("tiny")
    assert plain.eos_token_ids == frozenset(plain.tokenizer.eos_token_ids)
    registry = registry_for(tmp_path, tiny_checkpoints["llama"], ("more", ClaimLlama(MoreStops())))
    loaded = registry.load("tiny")
    vocab = loaded.tokenizer.get_vocab()
    assert loaded.family.name == "llama-more-stops"
    assert loaded.eos_token_ids == plain.eos_token_ids | {vocab["<|start_header_id|>"]}


def test_unknown_model_type_names_it() -> None:
    with pytest.raises(UnknownModelTypeError, match="'no_such_type' is not supported: .* mlx-lm"):
        load_plugins().family_for("no_such_type")
    with pytest.raises(UnknownModelTypeError, match="no enabled plugin claims .*'no_such_type'"):
        load_plugins(enabled=["llama"]).family_for("no_such_type")


def test_a_type_only_mlx_lm_knows_is_served_by_the_generic_family() -> None:
    plugins = load_plugins()
    assert plugins.family_for("mamba").name == "generic"
    assert plugins.family_for("qwen3_next").name == "qwen"


# ---- one test per hook -----------------------------------------------------------------


def test_hook_mlxserve_families() -> None:
    results = load_plugins().hook.mlxserve_families()
    families = [f for result in results for f in result]
    claimed = {t for f in families for t in f.model_types}
    assert claimed >= {"llama", "qwen2", "qwen3", "mistral", "deepseek_v2", "deepseek_v3"}


def test_hook_mlxserve_sharding_rule(tmp_path: Path, tiny_checkpoints: dict[str, Path]) -> None:
    class MarkedLayout(DecoderLayout):
        pass

    class Override:
        @hookimpl
        def mlxserve_sharding_rule(self, family: ModelFamily, model: object) -> DecoderLayout:
            return MarkedLayout(model, head="lm_head")

    registry = registry_for(tmp_path, tiny_checkpoints["llama"], ("override", Override()))
    loaded = registry.load("tiny")
    assert type(loaded.stage.layout) is MarkedLayout
    default = registry_for(tmp_path, tiny_checkpoints["llama"]).load("tiny")
    assert type(default.stage.layout) is DecoderLayout


def test_hook_mlxserve_kv_cache_factory(tmp_path: Path, tiny_checkpoints: dict[str, Path]) -> None:
    class Windowed:
        @hookimpl
        def mlxserve_kv_cache_factory(self, family, model, options, layers):  # noqa: ANN001, ANN201
            return [RotatingKVCache(max_size=1024) for _ in layers]

    registry = registry_for(tmp_path, tiny_checkpoints["llama"], ("windowed", Windowed()))
    caches = registry.load("tiny").make_cache(KVCacheOptions())
    assert len(caches) == 4 and all(type(c) is RotatingKVCache for c in caches)


def test_a_cache_factory_that_changes_the_output_is_refused_at_load(
    tmp_path: Path, tiny_checkpoints: dict[str, Path]
) -> None:
    class TooShort:
        @hookimpl
        def mlxserve_kv_cache_factory(self, family, model, options, layers):  # noqa: ANN001, ANN201
            return [RotatingKVCache(max_size=8) for _ in layers]

    registry = registry_for(tmp_path, tiny_checkpoints["llama"], ("short", TooShort()))
    with pytest.raises(ExactnessError, match="llama: layers 0-3 differ from mlx-lm's"):
        registry.load("tiny")


def test_hook_mlxserve_chat_template(tmp_path: Path, tiny_checkpoints: dict[str, Path]) -> None:
    messages = [{"role": "user", "content": "hi"}]
    loaded = registry_for(tmp_path, tiny_checkpoints["qwen"]).load("tiny")
    tokenizer = loaded.tokenizer
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"

    class Plain:
        @hookimpl
        def mlxserve_chat_template(self, family: ModelFamily, tokenizer: object) -> str:
            return "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"

    loaded = registry_for(tmp_path, tiny_checkpoints["qwen"], ("plain", Plain())).load("tiny")
    text = loaded.tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "user: hi\n"


def test_hook_mlxserve_tool_call_format() -> None:
    plugins = load_plugins()
    formats = {
        name: plugins.hook.mlxserve_tool_call_format(family=plugins.family(name))
        for name in BUILTIN_FAMILIES
    }
    assert {name: fmt.name for name, fmt in formats.items()} == {
        "llama": "llama",
        "qwen": "hermes",
        "mistral": "mistral",
        "deepseek": "deepseek",
    }

    class NoTools(Llama):
        name = "llama-no-tools"
        tool_call_format = None

    assert plugins.hook.mlxserve_tool_call_format(family=NoTools()) is None

    class HermesForLlama:
        @hookimpl
        def mlxserve_tool_call_format(self, family: ModelFamily) -> ToolCallFormat | None:
            return HermesToolCalls() if family.name == "llama" else None

    plugins = load_plugins(extra=[("hermes", HermesForLlama())])
    llama, mistral = plugins.family("llama"), plugins.family("mistral")
    assert plugins.hook.mlxserve_tool_call_format(family=llama).name == "hermes"
    assert plugins.hook.mlxserve_tool_call_format(family=mistral) is mistral.tool_call_format


def test_hook_mlxserve_reasoning_format() -> None:
    plugins = load_plugins()
    for name in ("qwen", "deepseek"):
        fmt = plugins.hook.mlxserve_reasoning_format(family=plugins.family(name))
        assert isinstance(fmt, ThinkTags) and fmt.end == "</think>"
    for name in ("llama", "mistral"):
        assert plugins.hook.mlxserve_reasoning_format(family=plugins.family(name)) is None

    class ReasoningLlama:
        @hookimpl
        def mlxserve_reasoning_format(self, family: ModelFamily) -> ReasoningFormat | None:
            return ThinkTags("<reasoning>", "</reasoning>") if family.name == "llama" else None

    plugins = load_plugins(extra=[("reasoning-llama", ReasoningLlama())])
    llama, qwen = plugins.family("llama"), plugins.family("qwen")
    assert plugins.hook.mlxserve_reasoning_format(family=llama).end == "</reasoning>"
    assert plugins.hook.mlxserve_reasoning_format(family=qwen) is qwen.reasoning_format


def test_family_template_is_the_fallback_when_the_tokenizer_has_none(
    tmp_path: Path, tiny_checkpoints: dict[str, Path]
) -> None:
    import json
    import shutil

    checkpoint = tmp_path / "no-template"
    shutil.copytree(tiny_checkpoints["mistral"], checkpoint)
    config_file = checkpoint / "tokenizer_config.json"
    tokenizer_config = json.loads(config_file.read_text())
    del tokenizer_config["chat_template"]
    config_file.write_text(json.dumps(tokenizer_config))
    loaded = registry_for(tmp_path, checkpoint).load("tiny")
    text = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == "<s>[INST] hi [/INST]"


# ---- meta: every hook is tested and documented -----------------------------------------


def test_every_hook_has_a_test() -> None:
    tests = set(globals())
    missing = [name for name in HOOK_NAMES if f"test_hook_{name}" not in tests]
    assert not missing, f"hooks without a test_hook_<name>: {missing}"
