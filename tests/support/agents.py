"""The coding agents people run (Codex CLI, Claude Code), installed from npm into
tests/agents/node_modules by the test command, pointed at a real server, and the tiny model
of long context they are run against."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from mlxserve.core.model.loader import build_model
from mlxserve.plugins.families.llama import Llama

AGENTS = Path(__file__).parents[1] / "agents"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
END_CHANCE = 0.25
SMALL = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
}


def agent_binary(name: str) -> Path:
    """The npm-installed command ``name`` (skips, or fails under CI, without it)."""
    binary = AGENTS / "node_modules" / ".bin" / name
    if not binary.exists():
        reason = f"{name} is not installed: run `npm ci --prefix tests/agents`"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return binary


def write_long_context_tiny(demo: Path, dest: Path, context: int = 65536) -> Path:
    """A random-weight llama of two narrow layers with the demo's tokenizer and chat template
    (so an agent's prompt is as many tokens as on a real model) and a context of ``context``
    tokens: an agent's 20k-token prompt is prefilled in seconds.

    Random weights never end an answer, and an agent waits for the end of its 32k
    ``max_tokens``: this model's head reads one direction of the residual stream, which its
    embeddings set and its damped layers barely move, and ends a sampled answer with a
    chance of about ``END_CHANCE`` a token (a greedy one at once)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (demo / name).exists():
            shutil.copy(demo / name, dest / name)
    config = json.loads((demo / "config.json").read_text(encoding="utf-8"))
    config = {k: v for k, v in config.items() if k not in ("quantization", "mlxserve")}
    config.update(SMALL, max_position_embeddings=context, torch_dtype="float32")
    config.update(tie_word_embeddings=False)
    config["mlxserve"] = {"tiny": True, "note": "random weights, the demo's tokenizer"}
    mx.random.seed(0)
    model = build_model(Llama().model_classes, config)
    weights = dict(tree_flatten(model.parameters()))
    for name, value in weights.items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            weights[name] = value * 0.01
    embed = weights["model.embed_tokens.weight"]
    weights["model.embed_tokens.weight"] = embed.at[:, 0].add(1.0 - embed[:, 0])
    weights["model.norm.weight"] = mx.zeros_like(weights["model.norm.weight"]).at[0].add(1.0)
    model.load_weights(list(weights.items()))
    direction = model.model(mx.array([[5, 6, 7, 8]]))[0, :, 0].mean().item()
    vocab, eos = config["vocab_size"], config["eos_token_id"][0]
    column = mx.random.normal((vocab,)) * 0.3
    rest = mx.logsumexp(column * direction).item()
    column[eos] = (rest + math.log(END_CHANCE / (1 - END_CHANCE))) / direction
    head = mx.zeros((vocab, config["hidden_size"])).at[:, 0].add(column)
    weights["lm_head.weight"] = head
    mx.save_safetensors(str(dest / "model.safetensors"), weights, metadata={"format": "mlx"})
    (dest / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return dest


@dataclass
class AgentRun:
    returncode: int
    output: str


def agent_env(home: Path, **extra: str) -> dict[str, str]:
    """A clean environment for an agent: its own home, no telemetry, only loopback."""
    home.mkdir(parents=True, exist_ok=True)
    keep = ("PATH", "LANG", "TERM", "TMPDIR")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.update(
        HOME=str(home),
        NO_PROXY="127.0.0.1,localhost",
        DISABLE_TELEMETRY="1",
        DISABLE_ERROR_REPORTING="1",
        CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
        DO_NOT_TRACK="1",
        **extra,
    )
    return env


def run_agent(argv: list[str], env: dict[str, str], cwd: Path, timeout: float) -> AgentRun:
    """Run an agent to its end (stdin closed), its stdout and stderr together."""
    done = subprocess.run(
        argv,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
    )
    return AgentRun(done.returncode, done.stdout)


def codex_home(home: Path, base_url: str, model: str) -> Path:
    """A CODEX_HOME whose config.toml points Codex at mlxserve, as the README shows."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'model = "{model}"\n'
        'model_provider = "mlxserve"\n\n'
        "[model_providers.mlxserve]\n"
        'name = "mlxserve"\n'
        f'base_url = "{base_url}/v1"\n'
        'wire_api = "responses"\n\n'
        "[analytics]\nenabled = false\n",
        encoding="utf-8",
    )
    return home
