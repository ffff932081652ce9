"""Configs and requests for the prefix-cache and disk-tier tests: model "m" with 16-token KV
blocks, and a 100-token prompt (six full blocks)."""

from __future__ import annotations

from pathlib import Path

from .server import post, write_config

PROMPT = [(i * 11) % 300 + 3 for i in range(100)]


def config_for(tmp_path: Path, checkpoint: Path, kv: str = "") -> object:
    """Serves ``checkpoint`` as "m" with 16-token blocks; ``kv`` goes in [kv_cache]."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    return write_config(
        tmp_path,
        f'[registry]\ndefault_model = "m"\ncache_dir = "{tmp_path / "cache"}"\n'
        f'[models.m]\nsource = "{checkpoint}"\n[kv_cache]\nblock_size = 16\n{kv}',
    )


def complete(server: object, prompt: list[int], max_tokens: int = 12) -> dict:
    """A greedy completion of ``prompt`` (eos ignored): the response's JSON."""
    body = {
        "model": "m",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    response = post(server, "/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def disk_config(tmp_path: Path, checkpoint: Path, extra: str = "") -> object:
    """As ``config_for``, with the disk tier in ``tmp_path/kv``; ``extra`` goes in [kv_cache]."""
    disk = tmp_path / "kv"
    return config_for(tmp_path / "server", checkpoint, f'disk_dir = "{disk}"\n{extra}')
