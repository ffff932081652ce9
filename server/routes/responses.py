"""POST /v1/responses: OpenAI's Responses API, statelessly, over the shared conversation."""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from mlxserve.server.conversation import (
    Event,
    Finished,
    ReasoningDelta,
    TextDelta,
    ToolCallEvent,
    start,
)
from mlxserve.server.deps import ConfigDep, EngineDep, MetricsDep, require_api_key
from mlxserve.server.errors import renamed_params, stream_error_kind
from mlxserve.server.http.body import OffLoopJsonRoute
from mlxserve.server.protocol.responses import (
    IncompleteDetails,
    OutputFunctionCall,
    OutputMessage,
    OutputReasoning,
    OutputText,
    ReasoningText,
    ResponseError,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
)
from mlxserve.server.streaming import sse_response, typed_event

router = APIRouter(
    prefix="/v1",
    tags=["responses"],
    dependencies=[Depends(require_api_key)],
    route_class=OffLoopJsonRoute,
)

# what the shared pipeline calls a field -> what this API calls it
RENAMES = {"messages": "input", "response_format": "text.format", "max_tokens": "max_output_tokens"}


log = logging.getLogger(__name__)
# Names the request's tools mlxserve left out (hosted tools it cannot run), when there are any.
IGNORED_TOOLS_HEADER = "x-mlxserve-ignored-tools"


def _header_safe(kind: str) -> str:
    """A client's tool type as a header may carry it (a type is the client's own text)."""
    return re.sub(r"[^A-Za-z0-9_.:-]", "?", kind)[:64]


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponseWriter:
    """Builds a response's output from the conversation's events, and gives the stream
    events that build it the same way on the client's side.

    Whitespace before any other text is held back, so a reply that is only tool calls has
    no empty message item. A thinking model's reasoning is a reasoning item before them.
    """

    def __init__(
        self,
        response: ResponseObject,
        call_names: Callable[[str], tuple[str, str | None]] = lambda name: (name, None),
    ) -> None:
        self.response = response
        self.call_names = call_names  # the model's name of a tool -> (name, namespace)
        self.sequence_number = 0
        self.message: OutputMessage | None = None
        self.reasoning: OutputReasoning | None = None
        self.held = ""

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        number, self.sequence_number = self.sequence_number, self.sequence_number + 1
        return {"type": kind, "sequence_number": number, **fields}

    def _snapshot(self) -> dict[str, Any]:
        return self.response.model_dump()

    def start(self) -> list[dict[str, Any]]:
        return [
            self.event("response.created", response=self._snapshot()),
            self.event("response.in_progress", response=self._snapshot()),
        ]

    def on(self, event: Event) -> list[dict[str, Any]]:
        if isinstance(event, ReasoningDelta):
            return self._reasoning(event.text)
        if isinstance(event, TextDelta):
            return self._text(event.text)
        if isinstance(event, ToolCallEvent):
            return self._call(event)
        return self._finish(event)

    def _reasoning(self, text: str) -> list[dict[str, Any]]:
        events = []
        if self.reasoning is None:
            self.reasoning = OutputReasoning(id=_id("rs"))
            index = len(self.response.output)
            self.response.output.append(self.reasoning)
            events.append(
                self.event(
                    "response.output_item.added",
                    output_index=index,
                    item=self.reasoning.model_dump(),
                )
            )
            self.reasoning.content.append(ReasoningText())
            events.append(
                self.event(
                    "response.content_part.added",
                    item_id=self.reasoning.id,
                    output_index=index,
                    content_index=0,
                    part=self.reasoning.content[0].model_dump(),
                )
            )
        self.reasoning.content[0].text += text
        where = self._reasoning_where(self.reasoning)
        return events + [self.event("response.reasoning_text.delta", **where, delta=text)]

    def _reasoning_where(self, item: OutputReasoning) -> dict[str, Any]:
        index = self.response.output.index(item)
        return {"item_id": item.id, "output_index": index, "content_index": 0}

    def _close_reasoning(self, status: Literal["completed", "incomplete"]) -> list[dict[str, Any]]:
        item, self.reasoning = self.reasoning, None
        if item is None or item.status != "in_progress":
            return []
        item.status = status
        where, part = self._reasoning_where(item), item.content[0]
        return [
            self.event("response.reasoning_text.done", **where, text=part.text),
            self.event("response.content_part.done", **where, part=part.model_dump()),
            self.event(
                "response.output_item.done",
                output_index=where["output_index"],
                item=item.model_dump(),
            ),
        ]

    def _open_message(self) -> list[dict[str, Any]]:
        self.message = OutputMessage(id=_id("msg"))
        index = len(self.response.output)
        self.response.output.append(self.message)
        added = self.event(
            "response.output_item.added", output_index=index, item=self.message.model_dump()
        )
        self.message.content.append(OutputText())
        part = self.event(
            "response.content_part.added",
            item_id=self.message.id,
            output_index=index,
            content_index=0,
            part=self.message.content[0].model_dump(),
        )
        return [added, part]

    def _text(self, text: str) -> list[dict[str, Any]]:
        events = []
        if self.message is None:
            if not (self.held + text).strip():
                self.held += text
                return []
            events = self._close_reasoning("completed") + self._open_message()
        assert self.message is not None
        text, self.held = self.held + text, ""
        self.message.content[0].text += text
        events.append(
            self.event(
                "response.output_text.delta",
                item_id=self.message.id,
                output_index=self.response.output.index(self.message),
                content_index=0,
                delta=text,
                logprobs=[],
            )
        )
        return events

    def _close_message(self, status: Literal["completed", "incomplete"]) -> list[dict[str, Any]]:
        message, self.message = self.message, None
        if message is None:
            return []
        index, part = self.response.output.index(message), message.content[0]
        message.status = status
        where = {"item_id": message.id, "output_index": index, "content_index": 0}
        return [
            self.event("response.output_text.done", **where, text=part.text, logprobs=[]),
            self.event("response.content_part.done", **where, part=part.model_dump()),
            self.event("response.output_item.done", output_index=index, item=message.model_dump()),
        ]

    def _call(self, call: ToolCallEvent) -> list[dict[str, Any]]:
        events = self._close_reasoning("completed") + self._close_message("completed")
        self.held = ""
        name, namespace = self.call_names(call.name)
        item = OutputFunctionCall(id=_id("fc"), call_id=call.id, name=name, namespace=namespace)
        index = len(self.response.output)
        self.response.output.append(item)
        where = {"item_id": item.id, "output_index": index}
        events.append(
            self.event("response.output_item.added", output_index=index, item=item.model_dump())
        )
        item.arguments, item.status = call.arguments, "completed"
        return events + [
            self.event("response.function_call_arguments.delta", **where, delta=call.arguments),
            self.event("response.function_call_arguments.done", **where, arguments=call.arguments),
            self.event("response.output_item.done", output_index=index, item=item.model_dump()),
        ]

    def _finish(self, finished: Finished) -> list[dict[str, Any]]:
        truncated = finished.reason == "length"
        events = self._close_reasoning("incomplete" if truncated else "completed")
        if not any(item.type != "reasoning" for item in self.response.output):
            events += self._open_message()  # an empty answer is still a message
            if self.held:
                events += self._text("")
        events += self._close_message("incomplete" if truncated else "completed")
        usage = finished.usage
        self.response.usage = ResponseUsage(
            input_tokens=usage.prompt_tokens,
            output_tokens=usage.completion_tokens,
            total_tokens=usage.prompt_tokens + usage.completion_tokens,
        )
        self.response.usage.input_tokens_details.cached_tokens = usage.cached_tokens
        self.response.usage.output_tokens_details.reasoning_tokens = usage.reasoning_tokens
        if truncated:
            self.response.status = "incomplete"
            self.response.incomplete_details = IncompleteDetails()
        else:
            self.response.status = "completed"
        return events + [self.event(f"response.{self.response.status}", response=self._snapshot())]

    def fail(self, code: str, message: str) -> list[dict[str, Any]]:
        self.response.status = "failed"
        self.response.error = ResponseError(code="server_error", message=message)
        return [
            self.event("error", code=code, message=message, param=None),
            self.event("response.failed", response=self._snapshot()),
        ]


def _fail(writer: ResponseWriter) -> Callable[[Exception], list[dict[str, Any]] | None]:
    def on_error(exc: Exception) -> list[dict[str, Any]] | None:
        kind = stream_error_kind(exc)
        return None if kind is None or kind.code is None else writer.fail(kind.code, str(exc))

    return on_error


@router.post("/responses", response_model=ResponseObject)
async def create_response(
    body: ResponsesRequest,
    request: Request,
    engine: EngineDep,
    config: ConfigDep,
    metrics: MetricsDep,
) -> Any:
    """Answer a conversation given as input items, at once or as a typed event stream."""
    with renamed_params(RENAMES):
        body.check_supported()
        conversation, sampling = body.conversation(), body.sampling()
        reply = await start(
            engine, config, body.model, conversation, sampling, request, metrics=metrics
        )
    params = reply.admitted.params
    writer = ResponseWriter(
        ResponseObject(
            id=_id("resp"),
            model=reply.model_name,
            instructions=body.instructions,
            max_output_tokens=body.max_output_tokens,
            parallel_tool_calls=conversation.parallel_tool_calls,
            temperature=params.temperature,
            top_p=params.top_p,
            text=body.echoed_text(),
            reasoning=body.reasoning.model_dump(exclude_none=True) if body.reasoning else None,
            tool_choice=body.echoed_tool_choice(),
            tools=[tool.model_dump(exclude_none=True) for tool in body.tools or ()],
            user=body.user,
            metadata=body.metadata or {},
        ),
        body.call_names,
    )
    headers = {}
    if body.ignored_tools:
        kinds = ", ".join(sorted({_header_safe(kind) for kind in body.ignored_tools}))
        log.info("a response request's %s tools are left out: mlxserve cannot run them", kinds)
        headers[IGNORED_TOOLS_HEADER] = kinds
    events = reply.events(engine)
    if body.stream:
        streamed = await sse_response(
            events,
            writer.on,
            opening=writer.start(),
            on_error=_fail(writer),
            frame=typed_event,
            closing=None,
        )
        streamed.headers.update(headers)
        return streamed
    async for event in events:
        writer.on(event)
    return JSONResponse(writer.response.model_dump(mode="json"), headers=headers)
