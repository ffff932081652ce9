"""The coding agents people run, as shipped (installed from npm by the test command; nothing
switched off but their telemetry), against ``mlxserve serve``: Codex CLI over the Responses
API and Claude Code over the Messages API, configured as the README shows, on a tiny model of
long context with the demo's tokenizer, and Codex on the demo itself. (Claude Code on the
demo is out of reach on two cores: the demo takes longer over its 20k-token prompt than
Claude Code's five-minute stream watchdog, which counts no ping, waits; see docs/api.md.)"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ..support.agents import (
    agent_binary,
    agent_env,
    codex_home,
    run_agent,
    write_long_context_tiny,
)
from ..support.processes import Served, served

ASK = "Say hello."
LONGER = "[models.m.kv_cache]\nmax_sequence_length = 32768\n"  # the demo was trained for 8k
# Sampled, the demo past its training context can ramble on for longer than Codex waits for a
# response (then Codex asks again, and again); greedy, its answer is the same every run.
GREEDY = "temperature = 0"
ROUTE_CLAUDE = 'model_patterns = {"claude-*" = "m"}'


@pytest.fixture(scope="module")
def demo_checkpoint(demo_cache: Path) -> Path:
    """The demo model as mlxserve converted it from its GGUF."""
    return next((demo_cache / "gguf").iterdir())


@pytest.fixture(scope="module")
def long_tiny(demo_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_long_context_tiny(demo_checkpoint, tmp_path_factory.mktemp("long") / "m")


@pytest.fixture(scope="module")
def short_tiny(demo_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("short") / "m"
    return write_long_context_tiny(demo_checkpoint, dest, context=16384)


def project(tmp_path: Path) -> Path:
    """A folder an agent works in: a git repository with one file, as a user's project."""
    work = tmp_path / "project"
    work.mkdir()
    (work / "README.md").write_text("# hello\n", encoding="utf-8")
    subprocess.run(["git", "init", "-q", str(work)], check=True)
    return work


def codex(tmp_path: Path, server: Served, timeout: float) -> str:
    """``codex exec`` of ASK against ``server``; its output (it must end with status 0)."""
    home = codex_home(tmp_path / "codex-home", server.url, "m")
    env = agent_env(tmp_path / "home", CODEX_HOME=str(home))
    argv = [str(agent_binary("codex")), "exec", ASK]
    run = run_agent(argv, env, project(tmp_path), timeout)
    assert run.returncode == 0, run.output[-3000:] + server.log.read_text()[-3000:]
    return run.output


def claude(tmp_path: Path, server: Served, timeout: float) -> tuple[int, str]:
    """``claude -p`` of ASK against ``server``: its exit status and output."""
    env = agent_env(tmp_path / "home", ANTHROPIC_BASE_URL=server.url, ANTHROPIC_API_KEY="sk-local")
    run = run_agent([str(agent_binary("claude")), "-p", ASK], env, project(tmp_path), timeout)
    return run.returncode, run.output


def refusals(server: Served) -> list[str]:
    """The server's log lines for requests it refused."""
    return [line for line in server.log.read_text().splitlines() if "server.errors" in line]


def test_codex_exec_completes_on_a_long_context_model(tmp_path: Path, long_tiny: Path) -> None:
    """Its ~9k-token prompt, namespace tools and hosted web_search as it sends them."""
    with served(tmp_path, long_tiny) as server:
        output = codex(tmp_path, server, timeout=300)
    log = server.log.read_text()
    assert '"POST /v1/responses HTTP/1.1" 200' in log
    assert "web_search tools are left out" in log
    assert refusals(server) == [], output


def test_claude_code_recovers_from_a_max_tokens_overflow(tmp_path: Path, long_tiny: Path) -> None:
    """Its ~20k-token prompt with max_tokens 64,000 passes a 64k context: Anthropic's wording
    for that overflow makes it ask again with fewer, and the answer comes. (Every refusal is
    that overflow: its side requests, such as a title, may overflow too.)"""
    with served(tmp_path, long_tiny, registry=ROUTE_CLAUDE) as server:
        status, output = claude(tmp_path, server, timeout=300)
    assert status == 0, output + server.log.read_text()[-3000:]
    overflows = refusals(server)  # on a slow machine Claude Code may ask more than once
    assert overflows, server.log.read_text()[-3000:]
    assert all("input length and `max_tokens` exceed context limit" in o for o in overflows)
    assert '"POST /v1/messages?beta=true HTTP/1.1" 200' in server.log.read_text()


def test_claude_code_says_its_prompt_is_too_long_for_a_short_context(
    tmp_path: Path, short_tiny: Path
) -> None:
    """A prompt longer than the whole context: Claude Code reads Anthropic's wording and
    tells its user so, rather than a bare API error."""
    with served(tmp_path, short_tiny, registry=ROUTE_CLAUDE) as server:
        status, output = claude(tmp_path, server, timeout=300)
    assert status != 0
    assert "Prompt is too long" in output
    assert all("prompt is too long: " in line for line in refusals(server))


@pytest.mark.slow
def test_codex_exec_answers_on_the_demo(tmp_path: Path, demo_checkpoint: Path) -> None:
    """The demo, run past its 8k training context for Codex's ~9k-token prompt, answers."""
    with served(tmp_path, demo_checkpoint, extra=LONGER, model=GREEDY) as server:
        output = codex(tmp_path, server, timeout=1200)
    assert refusals(server) == []
    answer = output.split("\ncodex\n")[-1].split("\ntokens used")[0].strip()
    assert answer, output
