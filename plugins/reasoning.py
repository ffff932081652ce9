"""Reasoning formats: how a family's thinking models set their reasoning apart from the answer.

A family's :class:`ReasoningFormat` says whether a rendered prompt leaves generation inside a
reasoning block, parses the streamed reply into reasoning and answer text, and names the text
that ends the reasoning (forced when a thinking budget runs out). :class:`ThinkTags`
(``<think>…</think>``) is the format of Qwen3 and DeepSeek R1/V3.1, :class:`HarmonyChannels`
(the analysis channel) gpt-oss's.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlxserve.plugins.tool_calls import TextPiece


@dataclass(frozen=True)
class ReasoningPiece:
    """Reply text that is the model's reasoning, not its answer."""

    text: str


ReplyPiece = ReasoningPiece | TextPiece


class ReasoningParser:
    """Reads one reply as it streams; gives out its reasoning and its answer text.

    A subclass implements ``_scan``: decide what it can of ``pending``, keeping only what may
    still become a marker (everything once ``final``).
    """

    pending = ""

    def feed(self, text: str) -> list[ReplyPiece]:
        """Add detokenized text; return what is decided (a possible marker's start waits)."""
        self.pending += text
        return self._scan(final=False)

    def finish(self) -> list[ReplyPiece]:
        """The reply has ended: the rest (an unclosed reasoning block stays reasoning)."""
        return self._scan(final=True)

    def _scan(self, final: bool) -> list[ReplyPiece]:
        raise NotImplementedError


class ReasoningFormat:
    """How one family's models write their reasoning; subclass it per format.

    Attributes:
        name: the format's name (for logs and ``plugins list``).
        end: the text that ends a reasoning block; a thinking budget forces it, and a
            grammar starts after it.
        markers: the fixed strings of the format; where a checkpoint has them as special
            tokens they are kept when detokenizing (the parser needs them).
    """

    name: str = "generic"
    end: str = ""
    markers: tuple[str, ...] = ()

    def opens_in(self, prompt: str) -> bool:
        """Whether a rendered prompt (its end is enough) leaves generation inside reasoning."""
        raise NotImplementedError

    def parser(self, *, inside: bool) -> ReasoningParser:
        """A new parser for one reply; ``inside``: the prompt opened the reasoning block."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<reasoning format {self.name}>"


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of ``text`` that is a proper start of ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


class TagParser(ReasoningParser):
    """One reasoning block between an opening and a closing tag, at the start of a reply.

    Outside the block, the opening tag counts only as the reply's first text (after
    whitespace); after the block everything is answer, tags included. Whitespace at the
    start of the reasoning, and between the block and the answer, is dropped.
    """

    def __init__(self, open_tag: str, close_tag: str, *, inside: bool) -> None:
        self.open_tag, self.close_tag = open_tag, close_tag
        self.state = "reasoning" if inside else "start"
        self.pending = ""
        self.at_start = inside  # of the reasoning or the answer: its leading whitespace goes

    def _scan(self, final: bool) -> list[ReplyPiece]:
        out: list[ReplyPiece] = []
        while True:
            if self.at_start:
                self.pending = self.pending.lstrip()
            if self.state == "start":
                body = self.pending.lstrip()
                if body.startswith(self.open_tag):
                    self.pending = body[len(self.open_tag) :]
                    self.state, self.at_start = "reasoning", True
                    continue
                if self.open_tag.startswith(body) and not final:
                    return out  # may still become the opening tag
                self.state = "answer"
            if self.state == "reasoning":
                end = self.pending.find(self.close_tag)
                if end >= 0:
                    self._add(out, ReasoningPiece(self.pending[:end]))
                    self.pending = self.pending[end + len(self.close_tag) :]
                    self.state, self.at_start = "answer", True
                    continue
                held = 0 if final else _partial_suffix(self.pending, self.close_tag)
                cut = len(self.pending) - held
                self._add(out, ReasoningPiece(self.pending[:cut]))
                self.pending = self.pending[cut:]
                return out
            self._add(out, TextPiece(self.pending))
            self.pending = ""
            return out

    def _add(self, out: list[ReplyPiece], piece: ReplyPiece) -> None:
        if not piece.text:
            return
        self.at_start = False
        last = out[-1] if out else None
        if isinstance(piece, ReasoningPiece) and isinstance(last, ReasoningPiece):
            out[-1] = ReasoningPiece(last.text + piece.text)
        elif isinstance(piece, TextPiece) and isinstance(last, TextPiece):
            out[-1] = TextPiece(last.text + piece.text)
        else:
            out.append(piece)


class ThinkTags(ReasoningFormat):
    """``<think>reasoning</think>answer``; the chat template may open the block itself."""

    name = "think-tags"

    def __init__(self, open_tag: str = "<think>", close_tag: str = "</think>") -> None:
        self.open_tag, self.close_tag = open_tag, close_tag
        self.end = close_tag
        self.markers = (open_tag, close_tag)

    def opens_in(self, prompt: str) -> bool:
        return prompt.rstrip().endswith(self.open_tag)

    def parser(self, *, inside: bool) -> ReasoningParser:
        return TagParser(self.open_tag, self.close_tag, inside=inside)


ANALYSIS, FINAL = "analysis", "final"
MAX_HEADER = 128  # characters a message header may take before it is judged plain text


class ChannelParser(ReasoningParser):
    """Messages in channels (OpenAI's harmony): ``<|channel|>NAME<|message|>text<|end|>``,
    each maybe after ``<|start|>assistant``. The analysis channel is reasoning; every other
    channel's text (final, commentary) is answer. Headers and ``<|end|>`` are never text."""

    START, CHANNEL, MESSAGE, END = "<|start|>", "<|channel|>", "<|message|>", "<|end|>"

    def __init__(self, *, inside: bool) -> None:
        self.channel: str | None = ANALYSIS if inside else None
        self.pending = ""

    def _scan(self, final: bool) -> list[ReplyPiece]:
        out: list[ReplyPiece] = []
        while self.pending:
            if self.channel is None:  # between messages: a header, or plain answer text
                if not self._header(final):
                    if not final and self._may_be_header():
                        return out
                    self.channel = FINAL
                continue
            end = self.pending.find(self.END)
            held = 0 if final or end >= 0 else _partial_suffix(self.pending, self.END)
            cut = end if end >= 0 else len(self.pending) - held
            text, self.pending = self.pending[:cut], self.pending[cut:]
            if text:
                out.append(ReasoningPiece(text) if self.channel == ANALYSIS else TextPiece(text))
            if end < 0:
                return out
            self.pending, self.channel = self.pending[len(self.END) :], None
        return out

    def _header(self, final: bool) -> bool:
        """Take a whole ``[<|start|>role]<|channel|>name<|message|>``; whether there was one."""
        rest = self.pending
        if rest.startswith(self.START):
            rest = rest[len(self.START) :]
            rest = rest[rest.find(self.CHANNEL) :] if self.CHANNEL in rest else rest
        if not rest.startswith(self.CHANNEL) or self.MESSAGE not in rest:
            return False
        name, _, rest = rest[len(self.CHANNEL) :].partition(self.MESSAGE)
        self.channel, self.pending = name.split()[0] if name.split() else FINAL, rest
        return True

    def _may_be_header(self) -> bool:
        """Whether the pending text could still grow into a header (so it must wait)."""
        text = self.pending
        if len(text) > MAX_HEADER:
            return False
        return any(
            m.startswith(text) or (text.startswith(m) and self.MESSAGE not in text)
            for m in (self.START, self.CHANNEL)
        )


class HarmonyChannels(ReasoningFormat):
    """gpt-oss's harmony format: the analysis channel is the reasoning, the final channel the
    answer. A budget ends the analysis message and opens the final one."""

    name = "harmony"
    end = "<|end|><|start|>assistant<|channel|>final<|message|>"
    markers = ("<|start|>", "<|channel|>", "<|message|>", "<|end|>")

    def opens_in(self, prompt: str) -> bool:
        return prompt.rstrip().endswith("<|channel|>analysis<|message|>")

    def parser(self, *, inside: bool) -> ReasoningParser:
        return ChannelParser(inside=inside)
