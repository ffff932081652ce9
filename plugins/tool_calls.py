"""Tool calls: how a family shows tools to its model and reads back the calls it writes.

A family's :class:`ToolCallFormat` renders tools, calls and results into the prompt (with
chat_prompt.py), parses calls out of the streamed reply, and gives the llguidance grammar that
forces a call.
:class:`HermesToolCalls` (``<tool_call>{...}</tool_call>``) is the default of every family.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

JSON_STYLE = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}


@dataclass(frozen=True)
class ToolCall:
    """One tool call: the function's name and its arguments as JSON text of an object."""

    name: str
    arguments: str


@dataclass(frozen=True)
class TextPiece:
    """Reply text the client sees as content."""

    text: str


ParsedPiece = TextPiece | ToolCall
# What MarkerParser.take gives: a region's pieces (a list of calls will do) and its length.
Region = tuple[Sequence[ParsedPiece], int]


class ToolCallParser:
    """Reads one reply as it streams; gives out its text and each call once it is whole."""

    def feed(self, text: str) -> list[ParsedPiece]:
        """Add detokenized text; return what is decided (text that may open a call waits)."""
        raise NotImplementedError

    def finish(self) -> list[ParsedPiece]:
        """The reply has ended: the rest, with an unfinished or malformed call as text."""
        raise NotImplementedError


class MarkerParser(ToolCallParser):
    """A reply whose calls sit in regions that each open with a marker.

    Text that may be the start of a marker is held back, and so is whitespace, which is
    dropped next to a call. A subclass says where a region ends and what it holds
    (:meth:`take`); ``openers_at_start`` open a region only at the start of the reply.
    """

    openers: tuple[str, ...] = ()
    openers_at_start: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.pending = ""
        self.started = False
        self.after_call = False

    def take(self, region: str, final: bool) -> Region | None:
        """The pieces of the region that ``region`` begins with, and the characters they use.

        None while later text could change the answer; at ``final`` (no more text comes)
        None means the region is unfinished, and it is given out as text.
        """
        raise NotImplementedError

    def feed(self, text: str) -> list[ParsedPiece]:
        self.pending += text
        return self._scan(final=False)

    def finish(self) -> list[ParsedPiece]:
        return self._scan(final=True)

    def _scan(self, final: bool) -> list[ParsedPiece]:
        out: list[ParsedPiece] = []
        while self.pending:
            if self.after_call:
                self.pending = self.pending.lstrip()
            start = self._opener_at()
            if start is None:
                cut = len(self.pending) - (0 if final else self._held())
                self._text(out, self.pending[:cut])
                self.pending = self.pending[cut:]
                break
            gap_at = len(self.pending[:start].rstrip())
            self._text(out, self.pending[:gap_at])
            self.pending = self.pending[gap_at:]
            gap = start - gap_at
            taken = self.take(self.pending[gap:], final)
            if taken is None:
                if final:
                    self._text(out, self.pending)
                    self.pending = ""
                break
            pieces, used = taken
            if not any(isinstance(piece, ToolCall) for piece in pieces):
                self._text(out, self.pending[:gap])
            for piece in pieces:
                if isinstance(piece, ToolCall):
                    out.append(piece)
                    self.started = self.after_call = True
                else:
                    self._text(out, piece.text)
            self.pending = self.pending[gap + used :]
        return out

    def _text(self, out: list[ParsedPiece], text: str) -> None:
        if not text:
            return
        self.after_call = False
        self.started = self.started or bool(text.strip())
        if out and isinstance(out[-1], TextPiece):
            out[-1] = TextPiece(out[-1].text + text)
        else:
            out.append(TextPiece(text))

    def _opener_at(self) -> int | None:
        if not self.started:
            body = self.pending.lstrip()
            if body.startswith(self.openers_at_start) and body:
                return len(self.pending) - len(body)
        hits = [i for i in (self.pending.find(opener) for opener in self.openers) if i >= 0]
        return min(hits) if hits else None

    def _held(self) -> int:
        text, partial = self.pending, 0
        for opener in self.openers:
            for n in range(min(len(opener) - 1, len(text)), partial, -1):
                if text.endswith(opener[:n]):
                    partial = n
                    break
        return len(text) - len(text[: len(text) - partial].rstrip())


class ToolCallFormat:
    """How one family's models see tools and write tool calls; subclass it per format.

    Attributes:
        name: the format's name (for logs and ``plugins list``).
        markers: the fixed strings of the format the model writes (``<tool_call>``...);
            where a checkpoint has them as single tokens, they must survive detokenizing
            and the grammar must name those tokens (see :func:`marker_token_ids`).
    """

    name: str = "generic"
    markers: tuple[str, ...] = ()

    def parser(self) -> ToolCallParser:
        """A new parser for one reply."""
        raise NotImplementedError

    def grammar(
        self, tools: list[dict[str, Any]], *, parallel: bool, special: Mapping[str, int] = {}
    ) -> str:
        """An llguidance Lark grammar: the whole reply is calls to ``tools`` in this format.

        Args:
            tools: OpenAI function tools; each call's arguments match its ``parameters``.
            parallel: one or more calls; else exactly one.
            special: markers that are single tokens of the checkpoint, with their ids.
        """
        raise NotImplementedError

    def render_calls(self, calls: list[ToolCall]) -> str:
        """An assistant turn's calls as the model itself writes them."""
        raise NotImplementedError

    def tools_prompt(self, tools: list[dict[str, Any]]) -> str:
        """System-prompt text that teaches the model the tools and how to call them."""
        raise NotImplementedError

    def render_result(self, name: str | None, content: str) -> str:
        """A tool's result as text, for templates that have no tool role."""
        return f"Result of {name or 'the tool call'}:\n{content}"

    def prompt_call_id(self, call_id: str) -> str:
        """A call id as the chat template accepts it (Mistral's insist on 9 characters)."""
        return call_id

    def __repr__(self) -> str:
        return f"<tool-call format {self.name}>"


# ---- shared pieces --------------------------------------------------------------------


def call_from_object(value: Any) -> ToolCall | None:
    """A call from ``{"name": ..., "arguments"|"parameters": {...}}``, or None if it is not."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(value["name"], json.dumps(arguments, ensure_ascii=False))


def json_calls(text: str) -> list[ToolCall] | None:
    """Calls written as JSON objects one after another (apart by whitespace or ``;``)."""
    decoder, at = json.JSONDecoder(), 0
    calls: list[ToolCall] = []
    while True:
        while at < len(text) and (text[at].isspace() or text[at] == ";"):
            at += 1
        if at == len(text):
            return calls or None
        try:
            value, at = decoder.raw_decode(text, at)
        except ValueError:
            return None
        call = call_from_object(value)
        if call is None:
            return None
        calls.append(call)


def arguments_value(call: ToolCall) -> Any:
    """A call's arguments as a JSON value (the text itself if it is not JSON)."""
    try:
        return json.loads(call.arguments)
    except ValueError:
        return call.arguments


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def lark_literal(text: str) -> str:
    return dumps(text)


def lark_marker(marker: str, special: Mapping[str, int]) -> str:
    """A marker in a grammar: its token where the checkpoint has one, else its text."""
    return f"<[{special[marker]}]>" if marker in special else lark_literal(marker)


def lark_json(schema: Mapping[str, Any] | None) -> str:
    """A JSON value matching ``schema``, written compactly (``{"a": 1, "b": 2}``)."""
    schema = dict(schema or {"type": "object"})
    options = schema.get("x-guidance", {})
    if not isinstance(options, Mapping):  # checked before (grammar_limits): never a 500
        raise ValueError("x-guidance must be an object (of llguidance's JSON options)")
    schema["x-guidance"] = {**JSON_STYLE, **options}
    return f"%json{dumps(schema)}"


def lark_json_call(name: str, parameters: Mapping[str, Any] | None, arguments_key: str) -> str:
    """Lark for ``{"name": NAME, "<arguments_key>": ARGS}``, ARGS valid against ``parameters``."""
    head = lark_literal(f'{{"name": {dumps(name)}, "{arguments_key}": ')
    return f'{head} {lark_json(parameters)} "}}"'


def calls_grammar(
    tools: list[dict[str, Any]],
    one_call: Callable[[str, Mapping[str, Any] | None], str],
    *,
    parallel: bool,
    separator: str,
    before: str = "",
    after: str = "",
) -> str:
    """Lark for ``before call (separator call)* after``; ``one_call(name, parameters)`` is
    the Lark of a call to one tool; separator, before and after are Lark too."""
    if not tools:
        raise ValueError("a tool-call grammar needs at least one tool")
    functions = [tool["function"] for tool in tools]
    calls = f"call ({separator} call)*" if parallel else "call"
    lines = [
        f"start: {' '.join(part for part in (before, calls, after) if part)}",
        f"call: {' | '.join(f'call_{i}' for i in range(len(functions)))}",
    ]
    for i, function in enumerate(functions):
        lines.append(f"call_{i}: {one_call(function['name'], function.get('parameters'))}")
    return "\n".join(lines) + "\n"


def tool_lines(tools: list[dict[str, Any]]) -> str:
    return "\n".join(dumps(tool) for tool in tools)


def marker_token_ids(fmt: ToolCallFormat, tokenizer: Any) -> dict[str, int]:
    """The format's markers that are single (added) tokens of ``tokenizer``, with their ids.

    Give them to :meth:`ToolCallFormat.grammar` as ``special``, and keep them when
    detokenizing a reply that may call tools.
    """
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    added = hf.get_added_vocab()
    return {marker: added[marker] for marker in fmt.markers if marker in added}


# ---- Hermes: <tool_call>{...}</tool_call> (Qwen, Hermes, and the default) ---------------

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"


class HermesParser(MarkerParser):
    openers = (TOOL_CALL_OPEN,)

    def take(self, region: str, final: bool) -> Region | None:
        end = region.find(TOOL_CALL_CLOSE, len(TOOL_CALL_OPEN))
        if end < 0:
            return None
        used = end + len(TOOL_CALL_CLOSE)
        calls = json_calls(region[len(TOOL_CALL_OPEN) : end])
        return (calls if calls and len(calls) == 1 else [TextPiece(region[:used])]), used


class HermesToolCalls(ToolCallFormat):
    """``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, one block a call."""

    name = "hermes"
    markers = (TOOL_CALL_OPEN, TOOL_CALL_CLOSE)

    def parser(self) -> ToolCallParser:
        return HermesParser()

    def grammar(
        self, tools: list[dict[str, Any]], *, parallel: bool, special: Mapping[str, int] = {}
    ) -> str:
        def one_call(name: str, parameters: Mapping[str, Any] | None) -> str:
            return (
                f'{lark_marker(TOOL_CALL_OPEN, special)} "\\n" '
                f"{lark_json_call(name, parameters, 'arguments')} "
                f'"\\n" {lark_marker(TOOL_CALL_CLOSE, special)}'
            )

        return calls_grammar(tools, one_call, parallel=parallel, separator='"\\n"')

    def render_calls(self, calls: list[ToolCall]) -> str:
        return "\n".join(
            f"{TOOL_CALL_OPEN}\n"
            f"{dumps({'name': call.name, 'arguments': arguments_value(call)})}\n"
            f"{TOOL_CALL_CLOSE}"
            for call in calls
        )

    def tools_prompt(self, tools: list[dict[str, Any]]) -> str:
        return (
            "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n"
            f"<tools>\n{tool_lines(tools)}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments "
            "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
        )

    def render_result(self, name: str | None, content: str) -> str:
        return f"<tool_response>\n{content}\n</tool_response>"
