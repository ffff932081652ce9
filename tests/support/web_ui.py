"""The web page's tests share a server of two models (llama, aliased "tiny", and qwen) and the
Accept header a browser sends."""

from __future__ import annotations

from pathlib import Path

BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


def two_models(tmp: Path, checkpoints: dict[str, Path], extra: str = "") -> str:
    return (
        f'[registry]\ndefault_model = "llama"\ncache_dir = "{tmp / "cache"}"\n'
        "max_loaded_models = 2\n"
        f'[models.llama]\nsource = "{checkpoints["llama"]}"\naliases = ["tiny"]\n'
        f'[models.qwen]\nsource = "{checkpoints["qwen"]}"\n{extra}'
    )
