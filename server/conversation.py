"""A conversation in, text and tool calls out: what the Chat Completions, Responses and
Messages APIs share.

Each API turns its request into a :class:`Conversation` (OpenAI chat-shaped messages, function
tools, a tool choice, an output format) and its stream of :data:`Event` back into its own wire
format. Here the model family decides how tools reach the prompt and how calls are read back
(its tool-call format); "required" and named tool choices, and JSON output formats, are
enforced by constrained decoding.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import Request

from mlxserve.core.config.schema import Config, ModelEntry
from mlxserve.core.engine.engine import Engine
from mlxserve.core.engine.sequence import TokenLogprob, Usage
from mlxserve.core.engine.worker import ServedModel
from mlxserve.core.metrics import EngineMetrics
from mlxserve.core.sampling.params import InvalidParameterError, SamplingParams
from mlxserve.plugins.chat_prompt import render_chat_prompt
from mlxserve.plugins.tool_calls import (
    TextPiece,
    ToolCall,
    ToolCallFormat,
    ToolCallParser,
    marker_token_ids,
)
from mlxserve.server.generation import (
    MAX_CHARS_PER_TOKEN,
    Admitted,
    admit,
    outputs,
    stop_watching,
    watch_disconnect,
)
from mlxserve.server.structured import check_tool_schemas, grammar_for_response_format

ParamsFactory = Callable[[ModelEntry | None, Mapping[str, float] | None], SamplingParams]


@dataclass
class Conversation:
    """What to answer, in OpenAI's chat shape.

    ``messages`` are dicts with ``role`` ("system", "user", "assistant" or "tool"),
    ``content`` (a string), and where they apply ``tool_calls`` (``[{"id", "type":
    "function", "function": {"name", "arguments"}}]``, arguments as JSON text),
    ``tool_call_id`` and ``name``. ``tools`` are OpenAI function tools (``{"type":
    "function", "function": {"name", "description", "parameters"}}``). ``tool_choice`` is
    "none", "auto", "required" or the name of one tool.
    """

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] = field(default_factory=list)
    tool_choice: str = "auto"
    parallel_tool_calls: bool = True
    response_format: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        names = [tool["function"]["name"] for tool in self.tools]
        if self.tool_choice not in ("none", "auto", "required") and self.tool_choice not in names:
            raise InvalidParameterError(
                "tool_choice", f"names no tool of this request ({self.tool_choice!r})"
            )
        if self.tool_choice == "required" and not self.tools:
            raise InvalidParameterError("tool_choice", "'required' needs at least one tool")

    @property
    def forces_a_call(self) -> bool:
        """Whether the reply must be a tool call ("required", or one tool named)."""
        return self.tool_choice not in ("none", "auto")

    @property
    def calls_tools(self) -> bool:
        """Whether the reply may contain tool calls (and so must be parsed for them)."""
        return bool(self.tools) and self.tool_choice != "none"


@dataclass(frozen=True)
class TextDelta:
    """New content text (with the log probabilities of its tokens, when asked for)."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class ToolCallEvent:
    """One whole tool call; ``index`` counts the calls of this reply from 0."""

    index: int
    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Finished:
    """The last event: why the reply ended ("stop", "length" or "tool_calls"), and usage."""

    reason: Literal["stop", "length", "tool_calls"]
    usage: Usage
    stop_sequence: str | None = None  # the stop string the reply ended on, if it did


Event = TextDelta | ToolCallEvent | Finished


# Every message costs the template at least a token of its own (its role, its markers).
MESSAGE_OVERHEAD_CHARS = MAX_CHARS_PER_TOKEN


def template_chars(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> int:
    """How many characters reach the chat template: every string (and key) of the messages
    and tools, plus an overhead per message; counted without walking any string itself."""
    total = MESSAGE_OVERHEAD_CHARS * len(messages)
    pending: list[Any] = [messages, tools]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, Mapping):
            total += sum(len(key) for key in item if isinstance(key, str))
            pending.extend(item.values())
        elif isinstance(item, list | tuple):
            pending.extend(item)
        elif item is not None:
            total += 8  # a number or a boolean, written out
    return total


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_call_format(model: ServedModel) -> ToolCallFormat | None:
    """The family's tool-call format (a plugin may override it), or None if it has none."""
    return getattr(model, "tool_call_format", None)


def _grammar(conversation: Conversation, fmt: ToolCallFormat | None, tokenizer: Any) -> str | None:
    if conversation.forces_a_call:
        if fmt is None:
            raise InvalidParameterError("tool_choice", "this model's family has no tool calls")
        special = marker_token_ids(fmt, tokenizer)
        if conversation.tool_choice == "required":
            check_tool_schemas(conversation.tools)
            parallel = conversation.parallel_tool_calls
            return fmt.grammar(conversation.tools, parallel=parallel, special=special)
        check_tool_schemas(conversation.tools, [conversation.tool_choice])
        named = [t for t in conversation.tools if t["function"]["name"] == conversation.tool_choice]
        return fmt.grammar(named, parallel=False, special=special)
    return grammar_for_response_format(conversation.response_format)


def _grammar_param(conversation: Conversation) -> str:
    """The field a grammar that cannot be compiled is blamed on: the forced tool's
    parameters (all the tools', when any may be called), or the response format."""
    if not conversation.forces_a_call:
        return "response_format"
    forced = [
        i
        for i, tool in enumerate(conversation.tools)
        if conversation.tool_choice in ("required", tool["function"]["name"])
    ]
    return f"tools[{forced[0]}].function.parameters" if len(forced) == 1 else "tools"


@dataclass
class Reply:
    """A conversation the engine has accepted; :meth:`events` reads its answer."""

    admitted: Admitted
    conversation: Conversation
    parser: ToolCallParser | None
    request: Request

    @property
    def model_name(self) -> str:
        return self.admitted.name

    async def events(self, engine: Engine) -> AsyncGenerator[Event, None]:
        """The reply as events, ending with :class:`Finished`; aborts it if not read to the
        end, or when its client goes away (then the events just stop, with no Finished).

        Raises:
            GenerationError, RequestTimeoutError, EngineUnavailableError: as ``outputs``.
        """
        watcher = watch_disconnect(engine, self.admitted, self.request)
        calls = 0
        try:
            async for output in outputs(engine, self.admitted):
                if output.finish_reason == "abort":  # its client went away: no one to tell
                    continue  # (and no Finished: "abort" is none of its reasons)
                pieces = self._parse(output.text, final=output.finish_reason is not None)
                logprobs = output.logprobs
                for piece in pieces:
                    if isinstance(piece, ToolCall):
                        yield ToolCallEvent(calls, new_call_id(), piece.name, piece.arguments)
                        calls += 1
                    elif piece.text or logprobs:
                        yield TextDelta(piece.text, logprobs)
                        logprobs = ()
                if logprobs:
                    yield TextDelta("", logprobs)
                if output.finish_reason is not None:
                    reason = "tool_calls" if calls else output.finish_reason
                    usage = output.usage or Usage(prompt_tokens=0, completion_tokens=0)
                    reason = "length" if reason == "length" else reason
                    yield Finished(reason, usage, output.stop_sequence)
        finally:
            await stop_watching(watcher)

    def _parse(self, text: str, final: bool) -> list[TextPiece | ToolCall]:
        if self.parser is None:
            return [TextPiece(text)]
        pieces = self.parser.feed(text) if text else []
        return pieces + self.parser.finish() if final else pieces


async def start(
    engine: Engine,
    config: Config,
    model_name: str | None,
    conversation: Conversation,
    make_params: ParamsFactory,
    request: Request,
    *,
    metrics: EngineMetrics | None = None,
) -> Reply:
    """Render the conversation with the model's chat template and tool format, and submit it."""
    fmt: ToolCallFormat | None = None

    def prompt(model: ServedModel, tokenizer: Any) -> list[int]:
        nonlocal fmt
        fmt = tool_call_format(model)
        try:
            return render_chat_prompt(
                tokenizer,
                getattr(model, "family", None),
                fmt,
                conversation.messages,
                conversation.tools,
            )
        except InvalidParameterError:
            raise
        except Exception as exc:  # Jinja templates raise their own errors for bad input
            raise InvalidParameterError(
                "messages", f"the chat template rejected the messages: {exc}"
            ) from exc

    def grammar(model: ServedModel, tokenizer: Any) -> str | None:  # after prompt(), same thread
        return _grammar(conversation, fmt, tokenizer)

    chars = template_chars(conversation.messages, conversation.tools)
    admitted = await admit(
        engine,
        config,
        model_name,
        make_params,
        prompt,
        prompt_chars=chars,
        metrics=metrics,
        grammar=grammar,
        grammar_param=_grammar_param(conversation),
    )
    parser = fmt.parser() if fmt is not None and conversation.calls_tools else None
    return Reply(admitted, conversation, parser, request)
