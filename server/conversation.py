"""The shared pipeline of every API: a request's input in, text and tool calls out.

Each API's request turns itself into a :class:`~mlxserve.server.protocol.request.Conversation`
(OpenAI chat-shaped messages, function tools, a tool choice, an output format) or, for text
completions, a :class:`~mlxserve.server.protocol.request.RawPrompt`, and its sampling
(:class:`~mlxserve.server.protocol.request.RequestedSampling`). :func:`start` admits them
(``server.generation.admit``); :meth:`Reply.events` reads the answer as :data:`Event`, which each
API's route writes in its own wire format. The model family decides how tools reach the prompt
and how calls are read back (its tool-call format); "required" and named tool choices, and
JSON output formats, are enforced by constrained decoding.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Literal

from fastapi import Request

from mlxserve.core.config.schema import Config
from mlxserve.core.engine.engine import Engine
from mlxserve.core.engine.sequence import TokenLogprob, Usage
from mlxserve.core.metrics import EngineMetrics
from mlxserve.plugins.reasoning import ReasoningParser, ReasoningPiece, ReplyPiece
from mlxserve.plugins.tool_calls import TextPiece, ToolCall, ToolCallParser
from mlxserve.server.generation import Admitted, admit, outputs, stop_watching, watch_disconnect
from mlxserve.server.protocol.request import Conversation, Prompt, RequestedSampling


@dataclass(frozen=True)
class TextDelta:
    """New content text (with the log probabilities of its tokens, when asked for)."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class PromptLogprobs:
    """The prompt's tokens from the second on, scored (first, when the request asked)."""

    logprobs: tuple[TokenLogprob, ...]


@dataclass(frozen=True)
class ReasoningDelta:
    """New reasoning text of a thinking model (never content, never parsed for tool calls)."""

    text: str


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


Event = ReasoningDelta | TextDelta | ToolCallEvent | Finished
ScoredEvent = PromptLogprobs | Event  # what a text completion that echoes its prompt reads


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class Reply:
    """A request the engine has accepted; :meth:`events` reads its answer."""

    admitted: Admitted
    prompt: Prompt
    parser: ToolCallParser | None  # None: the reply is all text
    request: Request
    reasoning: ReasoningParser | None = None  # None: the reply has no reasoning

    @property
    def model_name(self) -> str:
        return self.admitted.name

    async def events(self, engine: Engine) -> AsyncGenerator[Event, None]:
        """The reply as events, ending with :class:`Finished`; aborts it if not read to the
        end, or when its client goes away (then the events just stop, with no Finished).

        Raises:
            GenerationError, RequestTimeoutError, EngineUnavailableError: as ``outputs``.
        """
        async with aclosing(self.scored_events(engine)) as events:
            async for event in events:
                if not isinstance(event, PromptLogprobs):
                    yield event

    async def scored_events(self, engine: Engine) -> AsyncGenerator[ScoredEvent, None]:
        """As :meth:`events`, and first the prompt's log probabilities if it asked for them."""
        watcher = watch_disconnect(engine, self.admitted, self.request)
        calls = 0
        answering = self.reasoning is None
        try:
            async for output in outputs(engine, self.admitted):
                if output.finish_reason == "abort":  # its client went away: no one to tell
                    continue  # (and no Finished: "abort" is none of its reasons)
                if output.prompt_logprobs is not None:
                    yield PromptLogprobs(output.prompt_logprobs)
                pieces = self._parse(output.text, final=output.finish_reason is not None)
                answering = answering or any(
                    not isinstance(piece, ReasoningPiece) for piece in pieces
                )
                logprobs = output.logprobs if answering else ()  # the answer's tokens only
                for piece in pieces:
                    if isinstance(piece, ToolCall):
                        yield ToolCallEvent(calls, new_call_id(), piece.name, piece.arguments)
                        calls += 1
                    elif isinstance(piece, ReasoningPiece):
                        yield ReasoningDelta(piece.text)
                    elif piece.text or logprobs:
                        yield TextDelta(piece.text, logprobs)
                        logprobs = ()
                if logprobs:
                    yield TextDelta("", logprobs)
                if output.finish_reason is not None:  # "stop" or "length": outputs raises on errors
                    usage = output.usage or Usage(prompt_tokens=0, completion_tokens=0)
                    ended: Literal["stop", "length"] = (
                        "length" if output.finish_reason == "length" else "stop"
                    )
                    yield Finished("tool_calls" if calls else ended, usage, output.stop_sequence)
        finally:
            await stop_watching(watcher)

    def _parse(self, text: str, final: bool) -> list[ReasoningPiece | TextPiece | ToolCall]:
        """The reasoning first, then the answer's text and tool calls: calls are read in
        the answer alone."""
        split: list[ReplyPiece] = [TextPiece(text)]
        if self.reasoning is not None:
            split = self.reasoning.feed(text) if text else []
            split += self.reasoning.finish() if final else []
        pieces: list[ReasoningPiece | TextPiece | ToolCall] = []
        for piece in split:
            if isinstance(piece, ReasoningPiece) or self.parser is None:
                pieces.append(piece)
            elif piece.text:
                pieces += self.parser.feed(piece.text)
        if final and self.parser is not None:
            pieces += self.parser.finish()
        return pieces


async def start(
    engine: Engine,
    config: Config,
    model_name: str | None,
    prompt: Prompt,
    sampling: RequestedSampling,
    request: Request,
    *,
    metrics: EngineMetrics | None = None,
) -> Reply:
    """Admit a request's input (a conversation, rendered with the model's chat template and
    tool-call format, or a raw prompt) with its sampling; its reply reads the answer."""
    admitted = await admit(engine, config, model_name, prompt, sampling, metrics=metrics)
    fmt = admitted.model.tool_call_format
    calls_tools = isinstance(prompt, Conversation) and prompt.calls_tools
    parser = fmt.parser() if fmt is not None and calls_tools else None
    thinks = admitted.model.reasoning_format
    reasoning = None
    if thinks is not None and isinstance(prompt, Conversation):
        reasoning = thinks.parser(inside=admitted.reasoning_open)
    return Reply(admitted, prompt, parser, request, reasoning)
