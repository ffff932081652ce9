"""``mlxserve models list | pull | rm``, against a fake Hugging Face hub on 127.0.0.1.

huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE when imported, so every
check runs ``mlxserve`` in a subprocess with its own environment.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlxserve.server.cli.models import human_size

from ..support.fake_hub import FakeHub, commit_of
from ..support.processes import MLXSERVE

REPO = "fake-org/tiny-llama"
UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens there


@pytest.fixture
def workdir(tmp_path: Path, tiny_checkpoints: dict[str, Path]) -> Path:
    """A folder with an mlxserve.toml naming a hub, a missing, a built-in and a local model."""
    (tmp_path / "mlxserve.toml").write_text(
        f'[registry]\ndefault_model = "demo"\ncache_dir = "{tmp_path / "cache"}"\n'
        f'[models.remote]\nsource = "{REPO}"\naliases = ["r"]\n'
        '[models.missing]\nsource = "fake-org/nothing-here"\n'
        '[models.demo]\nsource = "builtin:tiny-llama"\n'
        f'[models.mine]\nsource = "{tiny_checkpoints["llama"]}"\nfamily = "llama"\n'
    )
    return tmp_path


@pytest.fixture
def hub(tiny_checkpoints: dict[str, Path]) -> Iterator[FakeHub]:
    with FakeHub({REPO: tiny_checkpoints["llama"]}) as hub:
        yield hub


def run(workdir: Path, endpoint: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``mlxserve ARGS`` in ``workdir``, with its own HF cache, talking to ``endpoint`` only."""
    inherited = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MLXSERVE_", "HF_", "TRANSFORMERS_"))
    }
    hf_env = {
        "HF_HOME": str(workdir / "hf"),
        "HF_ENDPOINT": endpoint,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_ETAG_TIMEOUT": "2",
        "HF_HUB_DOWNLOAD_TIMEOUT": "2",
    }
    return subprocess.run(
        [MLXSERVE, *args],
        cwd=workdir,
        env={**inherited, **hf_env, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def listed(result: subprocess.CompletedProcess[str]) -> dict[str, list[str]]:
    """``models list`` rows by name: the columns split on runs of two or more spaces."""
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "ALIASES", "SOURCE", "FAMILY", "CACHED", "SIZE", "NOTE"]
    rows = [[cell.strip() for cell in line.split("  ") if cell.strip()] for line in lines[1:]]
    return {row[0]: row for row in rows}


def api_calls(hub: FakeHub) -> list[str]:
    return [r for r in hub.requests if r.startswith("GET /api/models/")]


def test_list_works_offline_and_shows_what_is_on_disk(workdir: Path, hub: FakeHub) -> None:
    rows = listed(run(workdir, hub.url, "models", "list"))
    assert rows["remote"][1:] == ["r", REPO, "auto", "no", "-"]
    assert rows["demo"][1:] == ["-", "builtin:tiny-llama", "auto", "no", "-", "random weights"]
    assert rows["mine"][3:5] == ["llama", "yes"] and rows["mine"][5].endswith("MB")
    assert hub.requests == []


def test_pull_list_generate_offline_then_rm(workdir: Path, hub: FakeHub) -> None:
    pulled = run(workdir, hub.url, "models", "pull", "r")
    assert pulled.returncode == 0, pulled.stderr
    snapshot = workdir / "hf" / "hub" / "models--fake-org--tiny-llama" / "snapshots"
    assert str(snapshot / commit_of(REPO)) in pulled.stdout
    assert "in the Hugging Face cache" in pulled.stdout

    row = listed(run(workdir, hub.url, "models", "list"))["remote"]
    size = sum(f.stat().st_size for f in (snapshot / commit_of(REPO)).iterdir())
    assert row[4:] == ["yes", human_size(size), "random weights"]

    args = ("generate", "hi", "--model", "remote", "--max-tokens", "3")
    generated = run(workdir, UNREACHABLE, *args, HF_HUB_OFFLINE="1")
    assert generated.returncode == 0, generated.stderr

    removed = run(workdir, hub.url, "models", "rm", "remote")
    assert removed.returncode == 0, removed.stderr
    assert f"({human_size(size)} freed)" in removed.stdout
    assert not snapshot.parent.exists()
    assert listed(run(workdir, hub.url, "models", "list"))["remote"][4] == "no"


def test_pull_retries_while_the_hub_fails(workdir: Path, hub: FakeHub) -> None:
    hub.fail_first = 2
    result = run(workdir, hub.url, "models", "pull", "remote", "--retry-delay", "0.01")
    assert result.returncode == 0, result.stderr
    assert "hub unavailable (HTTP 503); retry 1/3" in result.stderr
    assert "retry 2/3" in result.stderr and "retry 3/3" not in result.stderr
    assert len(api_calls(hub)) == 4  # two failures, then repo info and file tree


def test_pull_gives_up_clearly_when_the_hub_is_unreachable(workdir: Path) -> None:
    args = ("models", "pull", "remote", "--retries", "2", "--retry-delay", "0.01")
    result = run(workdir, UNREACHABLE, *args)
    assert result.returncode == 1
    assert "retry 2/2" in result.stderr
    assert f"error: {REPO}: the Hugging Face hub cannot be reached" in result.stderr
    assert f"HF_ENDPOINT (now {UNREACHABLE})" in result.stderr
    assert "Traceback" not in result.stderr


def test_pull_unknown_repo_says_so_without_retrying(workdir: Path, hub: FakeHub) -> None:
    result = run(workdir, hub.url, "models", "pull", "missing", "--retry-delay", "0.01")
    assert result.returncode == 1
    assert "error: fake-org/nothing-here: not on the Hugging Face hub" in result.stderr
    assert "retry" not in result.stderr and "Traceback" not in result.stderr
    assert len(api_calls(hub)) == 1


def test_pull_in_offline_mode_says_so(workdir: Path, hub: FakeHub) -> None:
    result = run(workdir, hub.url, "models", "pull", "remote", HF_HUB_OFFLINE="1")
    assert result.returncode == 1
    assert "offline mode is on (HF_HUB_OFFLINE=1)" in result.stderr
    assert hub.requests == []


def test_builtin_pull_and_rm(workdir: Path) -> None:
    pulled = run(workdir, UNREACHABLE, "models", "pull", "demo")
    assert pulled.returncode == 0, pulled.stderr
    path = workdir / "cache" / "builtin" / "tiny-llama"
    assert f"demo: {path} (" in pulled.stdout and "random weights" in pulled.stdout
    size = sum(f.stat().st_size for f in path.iterdir())

    removed = run(workdir, UNREACHABLE, "models", "rm", "demo")
    assert removed.returncode == 0, removed.stderr
    assert f"({human_size(size)} freed)" in removed.stdout
    assert not path.exists()


def test_local_model_is_checked_but_never_removed(
    workdir: Path, tiny_checkpoints: dict[str, Path]
) -> None:
    pulled = run(workdir, UNREACHABLE, "models", "pull", "mine")
    assert pulled.returncode == 0, pulled.stderr
    assert "a local folder, nothing to download" in pulled.stdout

    removed = run(workdir, UNREACHABLE, "models", "rm", "mine")
    assert removed.returncode == 1
    assert "local models are not managed by mlxserve; delete the folder yourself" in (
        removed.stderr
    )
    assert (tiny_checkpoints["llama"] / "config.json").is_file()


def test_a_gguf_file_is_converted_listed_and_its_copy_removed(
    tmp_path: Path, tiny_checkpoints: dict[str, Path]
) -> None:
    from ..support.gguf_files import write_gguf

    gguf_file = write_gguf(tiny_checkpoints["llama"], tmp_path / "tiny.gguf", "llama")
    (tmp_path / "mlxserve.toml").write_text(
        f'[registry]\ndefault_model = "g"\ncache_dir = "{tmp_path / "cache"}"\n'
        f'[models.g]\nsource = "{gguf_file}"\n'
    )
    pulled = run(tmp_path, UNREACHABLE, "models", "pull", "g")
    assert pulled.returncode == 0, pulled.stderr
    assert f"; converted from {gguf_file})" in pulled.stdout
    [converted] = (tmp_path / "cache" / "gguf").iterdir()
    listed = run(tmp_path, UNREACHABLE, "models", "list").stdout.splitlines()[1].split()
    assert listed[:4] == ["g", "-", str(gguf_file), "auto"] and listed[4] == "yes"

    removed = run(tmp_path, UNREACHABLE, "models", "rm", "g")
    assert removed.returncode == 0, removed.stderr
    assert f"g: removed the converted copy of {gguf_file} (" in removed.stdout
    assert not converted.exists() and gguf_file.is_file()
