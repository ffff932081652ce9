"""GGUF files as model sources: round trips of tiny checkpoints, tensor types, errors, caching."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest

from mlxserve.core.config.schema import load_config
from mlxserve.core.errors import ModelNotFoundError, UnsupportedModelError
from mlxserve.plugins import hookimpl
from mlxserve.plugins.families.llama import Llama
from mlxserve.plugins.family import ModelFamily
from mlxserve.plugins.tiny import write_tiny_checkpoint
from mlxserve.registry.models import ModelRegistry
from mlxserve.registry.plugins import Plugins, load_plugins
from mlxserve.registry.store import ModelStore

from ..support.engine import greedy
from ..support.gguf_files import llama_cpp_row_order, write_gguf, write_tiny_gguf

Q = gguf.GGMLQuantizationType
PROMPT = [5, 9, 77, 120, 33, 8, 250, 19, 42, 7, 99, 3] * 4  # longer than Mistral's window
TEXTS = ["Hello, world! 2024", "  two spaces\n\nnew\ttab", "Ünïcödé 東京 🙂", "What is 3+4?"]


@pytest.fixture(scope="session")
def tiny_ggufs(
    tmp_path_factory: pytest.TempPathFactory,
    builtin_families: dict[str, ModelFamily],
    tiny_checkpoints: dict[str, Path],
) -> dict[str, tuple[Path, Path]]:
    """model -> (tiny checkpoint, the same as an F32 GGUF), written once; llama.cpp writes
    Mistral as a Llama."""
    root = tmp_path_factory.mktemp("gguf")
    qwen = builtin_families["qwen"]
    qwen2 = write_tiny_checkpoint(qwen, root / "qwen2", model_type="qwen2")
    qwen3_moe = write_tiny_checkpoint(qwen, root / "qwen3_moe", model_type="qwen3_moe")
    models = {
        "llama": (tiny_checkpoints["llama"], "llama"),
        "qwen2": (qwen2, "qwen2"),
        "qwen3": (tiny_checkpoints["qwen"], "qwen3"),
        "qwen3_moe": (qwen3_moe, "qwen3moe"),
        "mistral": (tiny_checkpoints["mistral"], "llama"),
    }
    return {
        name: (path, write_gguf(path, root / f"{name}.gguf", architecture))
        for name, (path, architecture) in models.items()
    }


def registry(
    tmp_path: Path, plugins: Plugins, family: str | None = None, **sources: Path | str
) -> ModelRegistry:
    toml = tmp_path / "mlxserve.toml"
    toml.write_text(
        f'[registry]\ndefault_model = "{next(iter(sources))}"\ncache_dir = "{tmp_path / "c"}"\n'
        + "".join(
            f'[models.{name}]\nsource = "{source}"\n' + (f'family = "{family}"\n' if family else "")
            for name, source in sources.items()
        )
    )
    return ModelRegistry(load_config(toml, env={}), plugins)


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3", "qwen3_moe", "mistral"])
def test_a_gguf_of_a_tiny_checkpoint_gives_its_greedy_tokens(
    name: str, tmp_path: Path, plugins: Plugins, tiny_ggufs: dict[str, tuple[Path, Path]]
) -> None:
    checkpoint, gguf_file = tiny_ggufs[name]
    family = "mistral" if name == "mistral" else None  # else llama's: the GGUF says "llama"
    models = registry(tmp_path, plugins, family, original=checkpoint, gguf=gguf_file)
    original, converted = models.load("original"), models.load("gguf")
    assert converted.family is original.family
    assert greedy(converted, PROMPT) == greedy(original, PROMPT)
    for text in TEXTS:
        assert converted.tokenizer.encode(text) == original.tokenizer.encode(text), text
    chat = [{"role": "user", "content": "Hi!"}]
    assert converted.tokenizer.apply_chat_template(chat) == original.tokenizer.apply_chat_template(
        chat
    )
    assert converted.eos_token_ids == original.eos_token_ids
    assert not converted.random_weights  # only tiny checkpoints say so, not GGUF files


@pytest.mark.parametrize(
    ("model", "architecture"), [("llama", "llama"), ("qwen3_moe", "qwen3moe")], ids=["llama", "moe"]
)
@pytest.mark.parametrize(
    "kind", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1], ids=lambda kind: kind.name
)
def test_quantized_tensors_are_read_as_their_values(
    kind: gguf.GGMLQuantizationType,
    model: str,
    architecture: str,
    tmp_path: Path,
    plugins: Plugins,
    tiny_ggufs: dict[str, tuple[Path, Path]],
) -> None:
    checkpoint = tiny_ggufs[model][0]
    quantized = write_gguf(checkpoint, tmp_path / "q.gguf", architecture, kind)
    dequantized = write_gguf(checkpoint, tmp_path / "f.gguf", architecture, kind, dequantized=True)
    store = ModelStore(tmp_path / "c", plugins)
    converted = store.locate(str(quantized))
    config = json.loads((converted / "config.json").read_text())
    bits = {Q.Q8_0: 8, Q.Q4_0: 4, Q.Q4_1: 4, Q.Q5_0: 5, Q.Q5_1: 5}[kind]
    assert config["quantization"] == {"group_size": 32, "bits": bits}
    assert config["mlxserve"]["description"].endswith(f"parameters, {kind.name} GGUF)")
    weights = mx.load(str(converted / "model.safetensors"))
    reference = mx.load(str(store.locate(str(dequantized)) / "model.safetensors"))
    for name, expected in reference.items():
        module = name.removesuffix(".weight")
        if f"{module}.scales" in weights:
            # float32 scales: mx.dequantize computes in the scales' dtype
            scales, biases = (
                weights[f"{module}.{p}"].astype(mx.float32) for p in ("scales", "biases")
            )
            values = mx.dequantize(weights[name], scales, biases, 32, bits)
            assert mx.array_equal(values, expected).item(), name
        else:
            assert mx.array_equal(weights[name], expected).item(), name


def test_bf16_tensors_are_read_bit_for_bit(
    tmp_path: Path, plugins: Plugins, tiny_ggufs: dict[str, tuple[Path, Path]]
) -> None:
    checkpoint = tiny_ggufs["qwen3"][0]
    path = write_gguf(checkpoint, tmp_path / "bf16.gguf", "qwen3", Q.BF16)
    converted = ModelStore(tmp_path / "c", plugins).locate(str(path))
    weights = mx.load(str(converted / "model.safetensors"))
    original = mx.load(str(checkpoint / "model.safetensors"))
    name = "model.layers.1.mlp.up_proj.weight"
    assert weights[name].dtype == mx.bfloat16
    assert mx.array_equal(weights[name], original[name].astype(mx.bfloat16)).item()


def test_llama_3_rope_scaling_is_recovered_from_rope_freqs(
    tmp_path: Path, plugins: Plugins, builtin_families: dict[str, ModelFamily]
) -> None:
    scaling = {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    checkpoint = write_tiny_checkpoint(
        builtin_families["llama"], tmp_path / "llama3", overrides={"rope_scaling": scaling}
    )
    gguf_file = write_gguf(checkpoint, tmp_path / "llama3.gguf", "llama")
    models = registry(tmp_path, plugins, original=checkpoint, gguf=gguf_file)
    config = json.loads((models.checkpoint("gguf") / "config.json").read_text())
    recovered = {"type": "llama3", **{k: v for k, v in scaling.items() if k != "rope_type"}}
    assert config["rope_scaling"] == recovered
    long_prompt = [(7 * i) % 500 + 3 for i in range(300)]  # past the high-frequency wavelength
    assert greedy(models.load("gguf"), long_prompt) == greedy(models.load("original"), long_prompt)


@pytest.mark.parametrize(
    "kind", [Q.IQ2_XXS, Q.IQ4_NL, Q.TQ2_0, Q.MXFP4], ids=lambda kind: kind.name
)
def test_an_unsupported_tensor_type_is_named(
    kind: gguf.GGMLQuantizationType, tmp_path: Path, plugins: Plugins
) -> None:
    path = write_tiny_gguf(tmp_path / "odd.gguf", kind=kind)
    with pytest.raises(UnsupportedModelError, match=rf"GGUF tensor type {kind.name} \(token_embd"):
        ModelStore(tmp_path / "c", plugins).locate(str(path))
    assert not (tmp_path / "c" / "gguf").exists() or not any((tmp_path / "c" / "gguf").iterdir())


def test_an_unconverted_architecture_is_named(tmp_path: Path, plugins: Plugins) -> None:
    path = write_tiny_gguf(tmp_path / "phi.gguf", architecture="phi2")
    with pytest.raises(UnsupportedModelError, match="GGUF architecture 'phi2'.*qwen2, qwen3"):
        ModelStore(tmp_path / "c", plugins).locate(str(path))


@pytest.mark.parametrize(
    ("architecture", "kind", "reason"),
    [
        ("gpt-oss", Q.MXFP4, "experts are MXFP4"),
        ("gemma3", Q.Q4_K, "no built-in family serves gemma3_text"),
        ("llama4", Q.F32, "no-rope layers, chunked attention"),
    ],
)
def test_an_unmapped_architecture_is_refused_before_its_tensors_are_read(
    architecture: str,
    kind: gguf.GGMLQuantizationType,
    reason: str,
    tmp_path: Path,
    plugins: Plugins,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = write_tiny_gguf(tmp_path / "m.gguf", architecture=architecture, kind=kind)

    def never(*args: object) -> None:
        raise AssertionError("a refused GGUF was read")

    monkeypatch.setattr("mlxserve.registry.gguf_checkpoint.read_gguf", never)
    monkeypatch.setattr("mlxserve.registry.store.WeightHashes.of", never)
    with pytest.raises(UnsupportedModelError) as refused:
        ModelStore(tmp_path / "c", plugins).locate(str(path))
    message = str(refused.value)
    assert f"GGUF architecture {architecture!r} (converted: llama, qwen2, qwen3, qwen3moe)" in (
        message
    )
    assert reason in message and kind.name + " (" not in message


def test_the_architecture_is_read_from_the_header_wherever_it_is(tmp_path: Path) -> None:
    from mlxserve.registry.gguf_checkpoint import gguf_architecture

    writer = gguf.GGUFWriter(str(tmp_path / "late.gguf"), "qwen3moe")
    writer.add_token_list(["a", "b", "ccc"])
    writer.add_token_scores([0.5, 0.25, 0.125])
    writer.add_string("general.name", "late")
    metadata = writer.kv_data[0]
    metadata["general.architecture"] = metadata.pop("general.architecture")  # last, not first
    writer.add_tensor("token_embd.weight", np.zeros((2, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    keys = list(gguf.GGUFReader(tmp_path / "late.gguf").fields)
    assert keys[-1] == "general.architecture"
    assert gguf_architecture(tmp_path / "late.gguf") == "qwen3moe"
    (tmp_path / "not.gguf").write_bytes(b"GGML" + bytes(20))
    with pytest.raises(UnsupportedModelError, match="not a GGUF file mlxserve can read"):
        gguf_architecture(tmp_path / "not.gguf")


def test_a_folder_holding_one_gguf_is_a_source(
    tmp_path: Path, plugins: Plugins, tiny_ggufs: dict[str, tuple[Path, Path]]
) -> None:
    checkpoint, gguf_file = tiny_ggufs["qwen2"]
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(gguf_file, folder / "tiny-qwen2.gguf")
    models = registry(tmp_path, plugins, folder=f"{folder}", original=checkpoint)
    assert greedy(models.load("folder"), PROMPT, 8) == greedy(models.load("original"), PROMPT, 8)
    shutil.copy(gguf_file, folder / "again.gguf")
    with pytest.raises(ModelNotFoundError, match="holds 2 .gguf files"):
        models.checkpoint("folder")


def test_conversions_are_cached_by_contents(
    tmp_path: Path, plugins: Plugins, tiny_ggufs: dict[str, tuple[Path, Path]]
) -> None:
    gguf_file = tmp_path / "m.gguf"
    shutil.copy(tiny_ggufs["llama"][1], gguf_file)
    store = ModelStore(tmp_path / "c", plugins)
    assert store.status(str(gguf_file)).path == gguf_file  # not converted yet
    converted = store.locate(str(gguf_file))
    assert converted.parent == tmp_path / "c" / "gguf" and converted.name.startswith("m-")
    written = (converted / "config.json").stat().st_mtime_ns
    assert store.locate(str(gguf_file)) == converted
    assert (converted / "config.json").stat().st_mtime_ns == written
    assert store.status(str(gguf_file)).path == converted
    assert "tiny llama (" in (store.description(str(gguf_file)) or "")

    shutil.copy(tiny_ggufs["qwen2"][1], gguf_file)  # other contents, same name
    assert store.locate(str(gguf_file)) != converted
    assert store.remove(str(gguf_file)) > 0 and gguf_file.is_file()


def test_the_llama_cpp_row_order_is_undone() -> None:
    from mlxserve.plugins.gguf_mapping import unpermute_rows

    weight = np.arange(6 * 8 * 4, dtype=np.float32).reshape(48, 4)
    permuted = mx.array(llama_cpp_row_order(weight, heads=6))
    assert np.array_equal(np.array(unpermute_rows(permuted, heads=6)), weight)


class LlamaGGUF(Llama):
    name = "llama-gguf"
    model_types = ("llama-gguf",)
    mlx_lm_modules = {"llama-gguf": "llama"}


class ClaimsLlamaGGUF:
    def __init__(self, family: ModelFamily) -> None:
        self.family = family

    @hookimpl
    def mlxserve_families(self) -> list[ModelFamily]:
        return [self.family]


def test_a_plugin_family_converts_the_architectures_it_claims(
    tmp_path: Path, tiny_ggufs: dict[str, tuple[Path, Path]]
) -> None:
    gguf_file = str(tiny_ggufs["llama"][1])
    store = ModelStore(tmp_path / "c", load_plugins(extra=[("g", ClaimsLlamaGGUF(LlamaGGUF()))]))
    assert store.plugins.family_for_gguf("llama").name == "llama-gguf"  # third party first
    ours = json.loads((store.locate(gguf_file) / "config.json").read_text())
    assert (ours["model_type"], ours["mlxserve"]["gguf"]["family"]) == ("llama-gguf", "llama-gguf")
    chosen = store.locate(gguf_file, family="llama")  # a [models.NAME] family converts it
    assert json.loads((chosen / "config.json").read_text())["model_type"] == "llama"
    mistral = store.locate(gguf_file, family="mistral")  # claims no GGUF: the claimant converts
    assert json.loads((mistral / "config.json").read_text())["mlxserve"]["gguf"]["family"] == (
        "llama-gguf"
    )
