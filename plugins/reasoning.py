"""Reasoning formats: how a family's thinking models set their reasoning apart from the answer.

A family's :class:`ReasoningFormat` says whether a rendered prompt leaves generation inside a
reasoning block, parses the streamed reply into reasoning and answer text, and names the text
that ends the reasoning (forced when a thinking budget runs out). :class:`ThinkTags`
(``<think>…</think>``) is the format of Qwen3 and DeepSeek R1/V3.1.
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
    """Reads one reply as it streams; gives out its reasoning and its answer text."""

    def feed(self, text: str) -> list[ReplyPiece]:
        """Add detokenized text; return what is decided (a possible marker's start waits)."""
        raise NotImplementedError

    def finish(self) -> list[ReplyPiece]:
        """The reply has ended: the rest (an unclosed reasoning block stays reasoning)."""
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

    def feed(self, text: str) -> list[ReplyPiece]:
        self.pending += text
        return self._scan(final=False)

    def finish(self) -> list[ReplyPiece]:
        return self._scan(final=True)

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
