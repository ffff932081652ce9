"""A reply's events without a server: an aborted reply ends without a finished event, and the
Responses API's writer turns a failure mid-stream into an error event, then response.failed."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

from mlxserve.core.engine.engine import RequestStream
from mlxserve.core.engine.sequence import RequestOutput, Usage
from mlxserve.core.sampling.params import SamplingParams
from mlxserve.server.conversation import Conversation, Reply, TextDelta
from mlxserve.server.generation import Admitted
from mlxserve.server.protocol.responses import ResponseObject
from mlxserve.server.routes.responses import ResponseWriter


def test_an_aborted_reply_ends_without_a_finished_event() -> None:
    """An abort (the engine's answer to a client that went away) is no way for a reply to
    finish: every API's writer knows only stop, length and tool_calls, so it must not see one,
    whichever way the abort and the disconnect race."""

    async def events() -> list[object]:
        stream = RequestStream("r", asyncio.get_running_loop())
        stream.put(RequestOutput("r", text="Once", token_ids=(7,)))
        usage = Usage(prompt_tokens=3, completion_tokens=1)
        stream.put(RequestOutput("r", finish_reason="abort", usage=usage))
        model = SimpleNamespace(name="m")
        admitted = Admitted("m", model, stream, SamplingParams(), time.monotonic() + 30)
        never = asyncio.Event()

        async def receive() -> dict[str, str]:  # the watcher does not get there first
            await never.wait()
            return {"type": "http.disconnect"}

        conversation = Conversation([{"role": "user", "content": "hi"}])
        reply = Reply(admitted, conversation, None, SimpleNamespace(receive=receive))
        engine = SimpleNamespace(abort=lambda request_id: None, shutting_down=False, error=None)
        return [event async for event in reply.events(engine)]

    assert asyncio.run(events()) == [TextDelta("Once")]


def test_a_failure_mid_stream_is_an_error_event_then_response_failed() -> None:
    writer = ResponseWriter(ResponseObject(id="resp_1", model="qwen"))
    events = writer.start() + writer.on(TextDelta("Hi")) + writer.fail("timeout", "too slow")
    assert [e["type"] for e in events][-2:] == ["error", "response.failed"]
    assert events[-2]["code"] == "timeout" and events[-2]["message"] == "too slow"
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["message"] == "too slow"
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
