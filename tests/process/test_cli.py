"""The mlxserve command, run as an operator would run it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from mlx_lm import generate, load

from ..support import BUILTIN_FAMILIES, REPO
from ..support.processes import MLXSERVE


def run(
    *args: str, cwd: Path = REPO, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MLXSERVE_")}
    return subprocess.run(
        [MLXSERVE, *args],
        cwd=cwd,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_shipped_config_passes_check() -> None:
    result = run("config", "check", "mlxserve.toml")
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[server]\nport = 99999\n",
            "bad.toml: server.port: must be between 1 and 65535 (got 99999)",
        ),
        ("[server]\nprot = 80\n", "bad.toml: server.prot: unknown key (did you mean 'port'?)"),
        ("[server]\nport = \n", "bad.toml: invalid TOML at line 2, column"),
    ],
)
def test_config_check_rejects_with_a_message_and_no_traceback(
    tmp_path: Path, text: str, message: str
) -> None:
    (tmp_path / "bad.toml").write_text(text)
    result = run("config", "check", "bad.toml", cwd=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_env_error_names_the_variable(tmp_path: Path) -> None:
    result = run("config", "check", cwd=tmp_path, env={"MLXSERVE_SERVER__PORT": "http"})
    assert result.returncode != 0
    assert "MLXSERVE_SERVER__PORT: server.port:" in result.stderr


def test_config_show_masks_secrets(tmp_path: Path) -> None:
    (tmp_path / "mlxserve.toml").write_text('[server]\napi_keys = ["sk-secret-123"]\n')
    result = run("config", "show", cwd=tmp_path, env={"MLXSERVE_SERVER__PORT": "9001"})
    assert result.returncode == 0, result.stderr
    assert "sk-secret-123" not in result.stdout
    assert "port = 9001" in result.stdout


def test_plugins_list_shows_every_family() -> None:
    result = run("plugins", "list")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for name in BUILTIN_FAMILIES:
        [line] = [x for x in lines if x.split()[0] == name]
        assert "mlxserve" in line and line.rstrip().endswith("yes")
    [gemma] = [x for x in lines if x.split()[0] == "gemma"]
    assert "mlxserve-example-family" in gemma and gemma.rstrip().endswith("no")


def test_plugins_list_honours_the_allow_list_env() -> None:
    result = run("plugins", "list", env={"MLXSERVE_PLUGINS": "qwen,gemma"})
    families = [line.split()[0] for line in result.stdout.splitlines()[1:]]
    assert families == ["gemma", "qwen"]


def test_plugins_list_reports_a_broken_plugin(tmp_path: Path) -> None:
    from ..support.plugins import write_broken_plugin

    write_broken_plugin(tmp_path)
    result = run("plugins", "list", env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0
    assert "plugin 'broken' (broken-plugin) failed to load: ImportError" in result.stdout
    assert "llama" in result.stdout


@pytest.mark.parametrize("family", BUILTIN_FAMILIES)
def test_models_tiny_writes_what_mlx_lm_loads(tmp_path: Path, family: str) -> None:
    result = run("models", "tiny", family, str(tmp_path / family))
    assert result.returncode == 0, result.stderr
    assert "random weights" in result.stdout
    model, tokenizer = load(str(tmp_path / family))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True
    )
    text = generate(model, tokenizer, prompt, max_tokens=8, verbose=False)
    assert isinstance(text, str) and len(tokenizer.encode(text)) >= 1
    size = sum(f.stat().st_size for f in (tmp_path / family).iterdir())
    assert size < 8 * 2**20


def test_models_tiny_is_reproducible(tmp_path: Path) -> None:
    for name in ("a", "b"):
        assert (
            run(
                "models", "tiny", "qwen", str(tmp_path / name), "--model-type", "qwen3_moe"
            ).returncode
            == 0
        )
    a, b = ((tmp_path / n / "model.safetensors").read_bytes() for n in ("a", "b"))
    assert a == b


def test_models_tiny_unknown_family(tmp_path: Path) -> None:
    result = run("models", "tiny", "falcon", str(tmp_path / "x"))
    assert result.returncode == 1
    assert "no enabled plugin provides family 'falcon'" in result.stderr


def test_generate_on_the_demo_model(tmp_path: Path, demo_cache: Path) -> None:
    env = {"MLXSERVE_REGISTRY__CACHE_DIR": str(demo_cache)}
    question = "What is the capital of France?"
    result = run(
        "generate", question, "--temperature", "0", "--max-tokens", "12", cwd=tmp_path, env=env
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "random weights" not in result.stderr


def test_generate_says_when_a_model_has_random_weights(tmp_path: Path) -> None:
    (tmp_path / "mlxserve.toml").write_text('[models.demo]\nsource = "builtin:tiny-llama"\n')
    env = {"MLXSERVE_REGISTRY__CACHE_DIR": str(tmp_path / "cache")}
    result = run("generate", "Hello!", "--max-tokens", "5", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert "random weights" in result.stderr
    assert (tmp_path / "cache" / "builtin" / "tiny-llama" / "config.json").is_file()


def test_generate_says_clearly_when_the_hub_is_unreachable(tmp_path: Path) -> None:
    (tmp_path / "mlxserve.toml").write_text(
        '[registry]\ndefault_model = "remote"\n[models.remote]\nsource = "someone/some-model"\n'
    )
    env = {
        "HF_HOME": str(tmp_path / "hf"),
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_HUB_ETAG_TIMEOUT": "2",
        "HF_HUB_DOWNLOAD_TIMEOUT": "2",
    }
    result = run("generate", "hi", cwd=tmp_path, env=env)
    assert result.returncode == 1
    assert "someone/some-model: the Hugging Face hub cannot be reached" in result.stderr
    assert "Traceback" not in result.stderr
