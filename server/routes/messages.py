"""POST /v1/messages: Anthropic's Messages API, over the shared conversation; and
POST /v1/messages/count_tokens, the length of the prompt such a request would render.

Clients' ``anthropic-beta`` headers and ``?beta=true`` (Anthropic's beta client) change
nothing here, and are never refused."""

from __future__ import annotations

import json
import uuid
from typing import Any

from fastapi import APIRouter, Depends, Request

from mlxserve.server.conversation import (
    Event,
    Finished,
    ReasoningDelta,
    TextDelta,
    ToolCallEvent,
    start,
)
from mlxserve.server.deps import ConfigDep, EngineDep, MetricsDep, require_api_key
from mlxserve.server.errors import stream_error_kind
from mlxserve.server.generation import count_prompt_tokens
from mlxserve.server.http.body import OffLoopJsonRoute
from mlxserve.server.protocol.anthropic import (
    CountTokensRequest,
    MessageResponse,
    MessagesRequest,
    MessageTokensCount,
    MessageUsage,
    StopReason,
    TextOut,
    ThinkingOut,
    ToolUseOut,
    anthropic_error_body,
)
from mlxserve.server.streaming import sse_response, typed_event

router = APIRouter(
    prefix="/v1",
    tags=["messages"],
    dependencies=[Depends(require_api_key)],
    route_class=OffLoopJsonRoute,
)

STOP_REASONS: dict[str, StopReason] = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
}


def _tool_input(arguments: str) -> dict[str, Any]:
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        value = None
    return value if isinstance(value, dict) else {}


class MessageWriter:
    """Builds the reply's content blocks from the conversation's events, and gives the
    stream events that build them the same way on the client's side.

    Whitespace before any other text is held back, so a reply that is only tool calls has
    no empty text block. A thinking model's reasoning is a thinking block before them.
    """

    def __init__(self, message: MessageResponse) -> None:
        self.message = message
        self.text: TextOut | None = None
        self.thinking: ThinkingOut | None = None
        self.held = ""

    def start(self) -> list[dict[str, Any]]:
        return [
            {"type": "message_start", "message": self.message.model_dump()},
            {"type": "ping"},
        ]

    def on(self, event: Event) -> list[dict[str, Any]]:
        if isinstance(event, ReasoningDelta):
            return self._thinking(event.text)
        if isinstance(event, TextDelta):
            return self._text(event.text)
        if isinstance(event, ToolCallEvent):
            return self._call(event)
        return self._finish(event)

    def _thinking(self, text: str) -> list[dict[str, Any]]:
        events = []
        if self.thinking is None:
            self.thinking = ThinkingOut(thinking="")
            self.message.content.append(self.thinking)
            events.append(self._block_start(self.thinking.model_dump()))
        self.thinking.thinking += text
        delta = {"type": "thinking_delta", "thinking": text}
        return events + [{"type": "content_block_delta", "index": self._index, "delta": delta}]

    def _close_thinking(self) -> list[dict[str, Any]]:
        block, self.thinking = self.thinking, None
        if block is None:
            return []
        index = self.message.content.index(block)
        delta = {"type": "signature_delta", "signature": block.signature}
        return [
            {"type": "content_block_delta", "index": index, "delta": delta},
            {"type": "content_block_stop", "index": index},
        ]

    def _text(self, text: str, *, flush: bool = False) -> list[dict[str, Any]]:
        events = []
        if self.text is None:
            if not (self.held + text).strip() and not flush:
                self.held += text
                return []
            events += self._close_thinking()
            self.text = TextOut(text="")
            self.message.content.append(self.text)
            events.append(self._block_start(self.text.model_dump()))
        text, self.held = self.held + text, ""
        self.text.text += text
        delta = {"type": "text_delta", "text": text}
        return events + [{"type": "content_block_delta", "index": self._index, "delta": delta}]

    @property
    def _index(self) -> int:
        return len(self.message.content) - 1

    def _block_start(self, block: dict[str, Any]) -> dict[str, Any]:
        return {"type": "content_block_start", "index": self._index, "content_block": block}

    def _close_text(self) -> list[dict[str, Any]]:
        if self.text is None:
            return []
        self.text = None
        return [{"type": "content_block_stop", "index": self._index}]

    def _call(self, call: ToolCallEvent) -> list[dict[str, Any]]:
        events, self.held = self._close_thinking() + self._close_text(), ""
        tool_id = "toolu_" + call.id.removeprefix("call_")
        block = ToolUseOut(id=tool_id, name=call.name, input=_tool_input(call.arguments))
        self.message.content.append(block)
        delta = {"type": "input_json_delta", "partial_json": json.dumps(block.input)}
        return events + [
            self._block_start(block.model_dump() | {"input": {}}),
            {"type": "content_block_delta", "index": self._index, "delta": delta},
            {"type": "content_block_stop", "index": self._index},
        ]

    def _finish(self, finished: Finished) -> list[dict[str, Any]]:
        events = self._close_thinking()
        answered = any(block.type != "thinking" for block in self.message.content)
        events += self._text("", flush=True) if self.held and not answered else []
        events += self._close_text()
        message = self.message
        stop_sequence = finished.stop_sequence if finished.reason == "stop" else None
        message.stop_sequence = stop_sequence
        message.stop_reason = "stop_sequence" if stop_sequence else STOP_REASONS[finished.reason]
        usage = finished.usage
        message.usage = MessageUsage(
            input_tokens=usage.prompt_tokens,
            output_tokens=usage.completion_tokens,
            cache_read_input_tokens=usage.cached_tokens,
        )
        delta = {"stop_reason": message.stop_reason, "stop_sequence": stop_sequence}
        return events + [
            {"type": "message_delta", "delta": delta, "usage": message.usage.model_dump()},
            {"type": "message_stop"},
        ]


def _anthropic_error(exc: Exception) -> list[dict[str, Any]] | None:
    kind = stream_error_kind(exc)
    return None if kind is None else [anthropic_error_body(kind.status, str(exc))]


@router.post("/messages", response_model=MessageResponse)
async def create_message(
    body: MessagesRequest,
    request: Request,
    engine: EngineDep,
    config: ConfigDep,
    metrics: MetricsDep,
) -> Any:
    """Answer a conversation, at once or as Anthropic's event stream."""
    body.check_supported()
    conversation, sampling = body.conversation(), body.sampling()
    reply = await start(
        engine, config, body.model, conversation, sampling, request, metrics=metrics
    )
    usage = MessageUsage(input_tokens=reply.admitted.prompt_tokens)
    message = MessageResponse(id=f"msg_{uuid.uuid4().hex}", model=reply.model_name, usage=usage)
    writer = MessageWriter(message)
    events = reply.events(engine)
    if body.stream:
        return await sse_response(
            events,
            writer.on,
            opening=writer.start(),
            on_error=_anthropic_error,
            frame=typed_event,
            closing=None,
            keepalive=typed_event({"type": "ping"}),
        )
    async for event in events:
        writer.on(event)
    return writer.message


@router.post("/messages/count_tokens", response_model=MessageTokensCount)
async def count_tokens(
    body: CountTokensRequest, engine: EngineDep, config: ConfigDep
) -> MessageTokensCount:
    """The prompt's length in tokens, rendered exactly as ``POST /v1/messages`` would (the
    model's chat template, tools, thinking switch): its ``usage.input_tokens``."""
    body.check_supported()
    _, tokens = await count_prompt_tokens(engine, config, body.model, body.conversation())
    return MessageTokensCount(input_tokens=tokens)
