"""The demo model on two pipeline ranks (``mlxserve launch``) still knows the capital of
France."""

from __future__ import annotations

from pathlib import Path

import httpx

from ..support.demo import ask
from ..support.processes import launched
from ..support.server import free_port_run


def test_the_demo_answers_on_two_pipeline_ranks(demo_cache: Path, tmp_path: Path) -> None:
    text = (
        f'[registry]\ncache_dir = "{demo_cache}"\n'
        f'[distributed]\nhosts = ["127.0.0.1", "127.0.0.1"]\nstrategy = "pipeline"\n'
        f"starting_port = {free_port_run()}\n"
    )
    with launched(tmp_path, text) as (url, _):
        stages = httpx.get(url + "/health", timeout=30).json()["placement"]["demo"]["stages"]
        assert [s["layers"] for s in stages] == [[15, 29], [0, 14]]
        assert "Paris" in ask(url)
