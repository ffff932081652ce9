"""Helpers the tests share; none of them is collected.

- ``server``: a real uvicorn server in a thread on 127.0.0.1 (``running_server``), configs,
  HTTP helpers.
- ``processes``: the ``mlxserve`` command, ``mlxserve launch`` on two loopback ranks.
- ``netns``: ranks in network namespaces of their own, on links shaped with tc netem.
- ``checkpoints``: bfloat16 and 4-bit copies of the tiny llama, and what to look at in them.
- ``engine``: sequences for the scheduler, greedy tokens from a loaded model.
- ``kv_cache``: configs and requests for the prefix-cache and disk-tier tests.
- ``disk``: pytest fixtures for real disk faults (tmpfs mounts), loaded by tests/conftest.py.
- ``schemas``: JSON schemas at and past the grammar compiler's limits.
- ``structured``: the structured-output schema and a chat helper.
- ``demo``: the demo model's question and how to ask it.
- ``plugins``: a plugin that fails to import.
- ``web_ui``: the web page tests' two-model config and a browser's Accept header.
- ``fake_hub``: a fake Hugging Face hub on 127.0.0.1.
- ``gguf_files``: GGUF files written the way llama.cpp's converter writes them.
- ``speculative``: completions compared token for token with and without speculation.
"""

from __future__ import annotations

from pathlib import Path

BUILTIN_FAMILIES = ("llama", "qwen", "mistral", "deepseek")
REPO = Path(__file__).resolve().parents[2]  # the checkout: pyproject.toml, mlxserve.toml, ...
